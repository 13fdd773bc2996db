"""The entries of a random projection matrix P (d, k): any block of rows, from the key alone.

Two generators, both pure functions of (key, row, column), so that a block of P is the
same whatever the block size, the batch size, or the number of devices:

* ``"hash"`` (default): every entry is a counter-based integer hash (two rounds of a 32-bit
  avalanche finaliser) of the key's two words, its row and its column. ~1.2-1.5e9 entries/s
  on a 2-core CPU, about fifteen times ``jax.random``'s threefry there.
* ``"threefry"`` / ``"rbg"``: ``jax.random`` itself on typed keys, in tiles of
  :data:`TILE_ROWS` rows and all k columns: tile t of checkpoint key c is
  ``jax.random.rademacher(fold_in(c', t), (TILE_ROWS, k))`` (or ``normal``) where c' is c
  as a key of that implementation. threefry gives the same matrix on every backend; rbg
  (XLA's RngBitGenerator, fast on TPU) may differ between backends and XLA versions.
  A block that starts inside a tile generates the tiles it touches and slices them; a
  block of columns generates whole tiles and slices them.

Rademacher entries are ±1 (exact in bfloat16); normal entries N(0, 1) (Box-Muller from two
24-bit uniforms for the hash).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["GENERATORS", "TILE_ROWS", "matrix_block"]

GENERATORS = ("hash", "threefry", "rbg")
TILE_ROWS = 256


# --- counter hash ----------------------------------------------------------------------
def _key_words(key: jax.Array) -> jax.Array:
    """Two uint32 words of a typed key (or of raw uint32 key data)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    words = jnp.asarray(key, jnp.uint32).reshape(-1)
    return words[:2] if words.shape[0] >= 2 else jnp.concatenate([words, words])


def _mix(h: jax.Array) -> jax.Array:
    """A 32-bit avalanche finaliser (lowbias32): every input bit flips each output bit
    with probability ~1/2."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def _hash(words: jax.Array, rows: jax.Array, cols: jax.Array, stream: int = 0) -> jax.Array:
    h = _mix(rows * jnp.uint32(0x9E3779B1) ^ words[0])
    return _mix(h ^ (cols * jnp.uint32(0x85EBCA77) + words[1] + jnp.uint32(stream * 0x68E31DA4)))


_ONE_BITS = {"bfloat16": 0x3F80, "float16": 0x3C00, "float32": 0x3F800000}


def _hash_block(distribution: str, dtype, key, row_start, num_rows: int, col_start,
                num_cols: int) -> jax.Array:
    words = _key_words(key)
    rows = (jnp.asarray(row_start, jnp.uint32) + jnp.arange(num_rows, dtype=jnp.uint32))[:, None]
    cols = (jnp.asarray(col_start, jnp.uint32)
            + jnp.arange(num_cols, dtype=jnp.uint32))[None, :]
    if distribution == "rademacher":
        # ±1 straight from bits: 1.0 with its sign bit taken from the hash's top bit
        # (top bit 1 -> +1). Bit patterns avoid slow bfloat16 arithmetic on CPUs.
        width = dtype.itemsize * 8
        uint = {16: jnp.uint16, 32: jnp.uint32}[width]
        sign = ((~_hash(words, rows, cols)) >> (32 - width)) & jnp.uint32(1 << (width - 1))
        return jax.lax.bitcast_convert_type(uint(_ONE_BITS[dtype.name]) | sign.astype(uint),
                                            dtype)
    # Box-Muller from two independent 24-bit uniforms; u1 in (0, 1] keeps log finite.
    scale = jnp.float32(1.0 / (1 << 24))
    u1 = ((_hash(words, rows, cols, 1) >> 8).astype(jnp.float32) + 1.0) * scale
    u2 = (_hash(words, rows, cols, 2) >> 8).astype(jnp.float32) * scale
    z = jnp.sqrt(-2.0 * jnp.log(u1)) * jnp.cos(2.0 * jnp.pi * u2)
    return z.astype(dtype)


# --- jax.random ------------------------------------------------------------------------
def _as_impl(key: jax.Array, impl: str) -> jax.Array:
    """The checkpoint's key as a typed key of ``impl`` (same words, so same seed, same P)."""
    data = _key_words(key)
    if impl == "threefry":
        return jax.random.wrap_key_data(data, impl="threefry2x32")
    return jax.random.wrap_key_data(jnp.concatenate([data, data]), impl="rbg")


def _random_block(distribution: str, generator: str, dtype, key, row_start, num_rows: int,
                  col_start, num_cols: int, proj_dim: int) -> jax.Array:
    base = _as_impl(key, generator)
    start = jnp.asarray(row_start, jnp.int32)
    first = start // TILE_ROWS
    count = -(-num_rows // TILE_ROWS) + 1  # tiles a block of num_rows can touch

    def tile(t):
        k = jax.random.fold_in(base, t)
        if distribution == "rademacher":
            return jax.random.rademacher(k, (TILE_ROWS, proj_dim), dtype)
        return jax.random.normal(k, (TILE_ROWS, proj_dim), jnp.float32).astype(dtype)

    # rbg's bits under vmap differ from its bits one call at a time: map over its tiles
    # sequentially, so a tile is the same whichever block generates it
    over = jax.vmap if generator == "threefry" else (lambda f: lambda t: jax.lax.map(f, t))
    tiles = over(tile)(first + jnp.arange(count)).reshape(count * TILE_ROWS, proj_dim)
    rows = jax.lax.dynamic_slice_in_dim(tiles, start - first * TILE_ROWS, num_rows, axis=0)
    if num_cols == proj_dim:
        return rows
    return jax.lax.dynamic_slice_in_dim(rows, jnp.asarray(col_start, jnp.int32), num_cols,
                                        axis=1)


def matrix_block(distribution: str, generator: str, dtype, proj_dim: int, key: jax.Array,
                 row_start, num_rows: int, col_start=0, num_cols: int | None = None
                 ) -> jax.Array:
    """Rows ``[row_start, row_start + num_rows)``, columns ``[col_start, col_start +
    num_cols)`` of P (d, proj_dim) -> ``(num_rows, num_cols)`` in ``dtype``.

    ``row_start`` and ``col_start`` may be traced; the sizes are static.
    """
    dtype = jnp.dtype(dtype)
    num_cols = proj_dim if num_cols is None else num_cols
    if generator == "hash":
        return _hash_jit(distribution, dtype, key, _index(row_start, jnp.uint32), num_rows,
                         _index(col_start, jnp.uint32), num_cols)
    return _random_jit(distribution, generator, dtype, key, _index(row_start, jnp.int32),
                       num_rows, _index(col_start, jnp.int32), num_cols, proj_dim)


# Jitted, so that a block asked for outside jit (Kronecker layer matrices, kept P, tests)
# is one compiled program per shape instead of dozens of op-by-op dispatches; inside a
# caller's jit they inline.
_hash_jit = jax.jit(_hash_block, static_argnums=(0, 1, 4, 6))
_random_jit = jax.jit(_random_block, static_argnums=(0, 1, 2, 5, 7, 8))


def _index(value, dtype):
    """A row or column offset as an array of ``dtype`` (a Python int would enter jit as
    int32 and overflow past 2**31 rows of a uint32 counter)."""
    if isinstance(value, (int, np.integer)):
        if not 0 <= value <= np.iinfo(dtype).max:
            raise ValueError(f"offset {value} is outside the projection's {np.dtype(dtype)} "
                             "row/column range")
        return np.asarray(value, dtype)
    return value
