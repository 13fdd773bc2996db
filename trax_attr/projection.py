"""Random projections φ = Pᵀ g / √d, generated block by block from an explicit key.

P (d, k) for checkpoint m is a pure function of ``key = fold_in(key(seed), m)`` and of
the entry's (row, column): every entry is a counter-based integer hash of the key's two
words, its row and its column. The matrix is therefore the same on every backend, for
every batch size and for every block size, and any block of it can be made on its own
inside ``jit`` without materialising the rest. Hashing runs at ~1.5e9 entries/s on a
2-core CPU, fifteen times ``jax.random``'s threefry, so P is regenerated block by block for
every batch, in blocks sized to the batch (below): ~490 GFLOP/s in bfloat16 for d = 1.13M,
k = 2048, batch 128, and 0.7x or more of the same run's matmul rate for d >= 1e5
(``benchmarks/featurize_dtype.py``, ``benchmarks/projection_roofline.py``). Keeping P
instead (``max_cache_bytes``, off by default) measured no faster: about equal for a
10k-parameter MLP and ~3.6x slower at d = 1.13M in bfloat16, where a 4.6 GB matrix is
streamed from memory.

Kinds:

* ``rademacher``: P_ij = ±1 with equal probability (exact in bfloat16);
* ``normal``: P_ij ~ N(0, 1) by Box-Muller from two hashes;
* ``identity``: no projection, P = I and k = d; always float32.

``dtype`` is the compute dtype of the projection matmul; accumulation is float32.
bfloat16 is the fast path (twice the float32 matmul rate here); float32 the exact one.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Projector",
    "rademacher",
    "normal",
    "identity",
    "get_projector",
    "projection_key",
    "matrix_block",
    "materialize",
    "projection_cache",
    "project",
    "PROJECTORS",
]

# Rows of P generated per block: 16 per example of the batch, at least 1024 and at most
# 16M entries. The block is written, then read by the dot: at small batches it should
# stay in the caches, at large ones the dot wants a long contraction. Measured on 2 cores
# (bfloat16, k 512 to 8192): batch 32 to 128 run fastest at about 1024 rows (2.0x the
# earlier fixed 16M-entry blocks at d = 1e5, k = 512, batch 32), batch 256 at about 4096
# and batch 1024 with the whole leaf as one block.
_MIN_BLOCK_ROWS = 1024
_ROWS_PER_EXAMPLE = 16
_MAX_BLOCK_ENTRIES = 1 << 24
DEFAULT_MAX_CACHE_BYTES = 0     # regenerate: as fast, and no memory (see above)


class Projector(NamedTuple):
    """A projection: kind, output dimension and compute dtype. Hashable, so it can be a
    static argument of ``jax.jit``.

    Attributes:
      kind: ``"rademacher"``, ``"normal"`` or ``"identity"``.
      proj_dim: k, the projected dimension (``None`` for identity: k = d).
      dtype: name of the compute dtype of the matmul (``"bfloat16"`` or ``"float32"``).
      block_rows: rows of P generated at once when it is not cached (``None``: automatic).
      max_cache_bytes: largest P, in bytes of ``dtype``, kept per checkpoint instead of
        regenerated per batch (default 0: always regenerate).
    """

    kind: str
    proj_dim: int | None
    dtype: str = "float32"
    block_rows: int | None = None
    max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES

    def output_dim(self, grad_dim: int) -> int:
        return grad_dim if self.kind == "identity" else int(self.proj_dim)

    def rows_per_block(self, grad_dim: int, batch: int = 1) -> int:
        """Rows of P generated at once for a batch of ``batch`` examples."""
        if self.block_rows is not None:
            return int(self.block_rows)
        most = max(_MIN_BLOCK_ROWS, _MAX_BLOCK_ENTRIES // self.output_dim(grad_dim))
        return min(max(_MIN_BLOCK_ROWS, _ROWS_PER_EXAMPLE * batch), most)


def _check_dims(kind: str, proj_dim, dtype, block_rows, max_cache_bytes) -> Projector:
    if isinstance(proj_dim, bool) or not isinstance(proj_dim, (int, np.integer)) or proj_dim < 1:
        raise ValueError(
            f"proj_dim must be a positive integer, got {proj_dim!r}; TRAK uses 512 to 8192 "
            "(2048 is a good default)."
        )
    name = jnp.dtype(dtype).name
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(
            f"dtype={dtype!r} is not a projection compute dtype; use jnp.bfloat16 (fast) or "
            "jnp.float32 (exact)."
        )
    if block_rows is not None and (not isinstance(block_rows, (int, np.integer)) or block_rows < 1):
        raise ValueError(f"block_rows must be a positive integer or None, got {block_rows!r}.")
    if not isinstance(max_cache_bytes, (int, np.integer)) or max_cache_bytes < 0:
        raise ValueError(
            f"max_cache_bytes must be a non-negative integer, got {max_cache_bytes!r}; "
            "0 turns the cache off."
        )
    return Projector(kind, int(proj_dim), name, block_rows, int(max_cache_bytes))


def rademacher(proj_dim: int, *, dtype=jnp.bfloat16, block_rows: int | None = None,
               max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES) -> Projector:
    """±1 projection to ``proj_dim`` dimensions (the TRAK default)."""
    return _check_dims("rademacher", proj_dim, dtype, block_rows, max_cache_bytes)


def normal(proj_dim: int, *, dtype=jnp.bfloat16, block_rows: int | None = None,
           max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES) -> Projector:
    """Standard normal projection to ``proj_dim`` dimensions."""
    return _check_dims("normal", proj_dim, dtype, block_rows, max_cache_bytes)


def identity() -> Projector:
    """No projection: φ = g / √d, k = d. Exact, for small models and parity tests."""
    return Projector("identity", None, "float32", None, 0)


PROJECTORS = {"rademacher": rademacher, "normal": normal, "identity": identity}


def get_projector(projector: str | Projector, proj_dim: int | None = None,
                  dtype=None) -> Projector:
    """Resolve ``projector=``: a Projector, or a name with ``proj_dim`` (and ``dtype``)."""
    if isinstance(projector, Projector) or getattr(projector, "kind", None) == "kronecker":
        return projector
    if not isinstance(projector, str) or projector not in PROJECTORS:
        raise ValueError(
            f"projector={projector!r} is not known; valid names are {sorted(PROJECTORS)}, or "
            "pass a trax_attr.Projector such as trax_attr.rademacher(2048)."
        )
    if projector == "identity":
        return identity()
    kwargs = {} if dtype is None else {"dtype": dtype}
    return PROJECTORS[projector](proj_dim, **kwargs)


def projection_key(seed: int, model_id: int) -> jax.Array:
    """The key of checkpoint ``model_id``'s matrix: fold_in(key(seed), model_id)."""
    return jax.random.fold_in(jax.random.key(seed), model_id)


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


def matrix_block(projector: Projector, key: jax.Array, row_start, num_rows: int,
                 col_start=0, num_cols: int | None = None) -> jax.Array:
    """Rows ``[row_start, row_start + num_rows)`` of P -> ``(num_rows, k)`` in its dtype.

    ``row_start`` and ``col_start`` may be traced; ``num_rows`` and ``num_cols`` (default
    k: all columns) are static. Not for the identity projector.
    """
    if projector.kind == "identity":
        raise ValueError("the identity projector has no random matrix; use project().")
    words = _key_words(key)
    rows = (jnp.asarray(row_start, jnp.uint32) + jnp.arange(num_rows, dtype=jnp.uint32))[:, None]
    num_cols = projector.proj_dim if num_cols is None else num_cols
    cols = (jnp.asarray(col_start, jnp.uint32)
            + jnp.arange(num_cols, dtype=jnp.uint32))[None, :]
    dtype = jnp.dtype(projector.dtype)
    if projector.kind == "rademacher":
        # ±1 straight from bits: 1.0 with its sign bit taken from the hash's top bit
        # (top bit 1 -> +1). Bit patterns avoid slow bfloat16 arithmetic on CPUs.
        width = dtype.itemsize * 8
        uint = {16: jnp.uint16, 32: jnp.uint32}[width]
        one = {"bfloat16": 0x3F80, "float16": 0x3C00, "float32": 0x3F800000}[dtype.name]
        sign = ((~_hash(words, rows, cols)) >> (32 - width)) & jnp.uint32(1 << (width - 1))
        return jax.lax.bitcast_convert_type(uint(one) | sign.astype(uint), dtype)
    # Box-Muller from two independent 24-bit uniforms; u1 in (0, 1] keeps log finite.
    scale = jnp.float32(1.0 / (1 << 24))
    u1 = ((_hash(words, rows, cols, 1) >> 8).astype(jnp.float32) + 1.0) * scale
    u2 = (_hash(words, rows, cols, 2) >> 8).astype(jnp.float32) * scale
    z = jnp.sqrt(-2.0 * jnp.log(u1)) * jnp.cos(2.0 * jnp.pi * u2)
    return z.astype(dtype)


def materialize(projector: Projector, key: jax.Array, grad_dim: int) -> jax.Array:
    """The whole matrix P ``(d, k)``; for tests and small d only."""
    if projector.kind == "identity":
        return jnp.eye(grad_dim, dtype=jnp.float32)
    return matrix_block(projector, key, 0, grad_dim)


def _leaf_matrix(projector: Projector, key, offset: int, size: int, rows: int) -> jax.Array:
    """Rows ``[offset, offset + size)`` of P, generated block by block in place."""
    full, rem = divmod(size, rows)
    out = jnp.zeros((size, projector.proj_dim), jnp.dtype(projector.dtype))

    def body(i, out):
        block = matrix_block(projector, key, offset + i * rows, rows)
        return jax.lax.dynamic_update_slice_in_dim(out, block, i * rows, axis=0)

    if full:
        out = jax.lax.fori_loop(0, full, body, out)
    if rem:
        out = out.at[full * rows:].set(matrix_block(projector, key, offset + full * rows, rem))
    return out


def projection_cache(projector: Projector, key: jax.Array,
                     leaf_sizes: tuple[int, ...]) -> tuple[jax.Array, ...] | None:
    """P split by parameter leaf, ``((size_l, k), ...)``, or ``None`` when it exceeds
    ``projector.max_cache_bytes`` (then :func:`project` regenerates blocks per batch)."""
    if projector.kind not in ("rademacher", "normal"):
        return None
    d = int(sum(leaf_sizes))
    nbytes = d * projector.proj_dim * jnp.dtype(projector.dtype).itemsize
    if nbytes > projector.max_cache_bytes:
        return None
    return _build_cache(projector, key, tuple(int(s) for s in leaf_sizes))


@jax.jit(static_argnums=(0, 2))
def _build_cache(projector, key, leaf_sizes):
    rows = projector.rows_per_block(sum(leaf_sizes))
    offsets = np.cumsum((0,) + leaf_sizes)
    return tuple(_leaf_matrix(projector, key, int(offsets[i]), size, rows)
                 for i, size in enumerate(leaf_sizes))


def _project_leaf(projector: Projector, key, g: jax.Array, offset: int, rows: int,
                  cached: jax.Array | None, col_start=0,
                  num_cols: int | None = None) -> jax.Array:
    """g (B, size) @ P[offset:offset+size, cols] -> (B, num_cols) f32, one block of rows
    at a time.

    Blocks come from ``cached`` (this leaf's rows of P, already restricted to the columns
    ``col_start + [0, num_cols)``: a proj-sharded kernel receives the cache column-sliced)
    or are generated for those columns. Blocking also keeps each matmul's contraction
    short, which XLA's CPU dot runs markedly faster (measured: 2x at d = 1M) than one dot
    over the whole leaf.
    """
    size = g.shape[1]
    full, rem = divmod(size, rows)
    num_cols = projector.proj_dim if num_cols is None else num_cols

    def block_of(start, num):
        if cached is None:
            return matrix_block(projector, key, offset + start, num, col_start, num_cols)
        return jax.lax.dynamic_slice_in_dim(cached, start, num, axis=0)

    def product(i, num):
        g_block = jax.lax.dynamic_slice_in_dim(g, i * rows, num, axis=1)
        return jnp.dot(g_block, block_of(i * rows, num), preferred_element_type=jnp.float32)

    # The sum starts from a product with g, not from zeros: inside shard_map the loop's
    # carry must vary over the devices exactly as g does.
    acc = product(0, rows) if full else product(0, rem)
    if full > 1:
        acc = jax.lax.fori_loop(1, full, lambda i, acc: acc + product(i, rows), acc)
    if full and rem:
        acc = acc + jnp.dot(g[:, full * rows:], block_of(full * rows, rem),
                            preferred_element_type=jnp.float32)
    return acc


def project(projector: Projector, key: jax.Array, grads: tuple[jax.Array, ...],
            cache: tuple[jax.Array, ...] | None = None, *, col_start=0,
            num_cols: int | None = None) -> jax.Array:
    """φ = Pᵀ g / √d for a batch of per-example gradients given leaf by leaf.

    Args:
      projector: the projection.
      key: the checkpoint's key, :func:`projection_key`.
      grads: ``((B, size_l), ...)``, the gradient split by parameter leaf; d = Σ size_l.
        The (B, d) gradient is never concatenated for random projectors.
      cache: optional :func:`projection_cache` of the same key and leaf sizes (only the
        columns ``col_start + [0, num_cols)`` of it when those are given).
      col_start, num_cols: compute only these columns of φ (``col_start`` may be traced);
        this is how proj_dim is split over devices. Default: all k.

    Returns:
      ``(B, num_cols)`` float32 projected gradients (``(B, k)`` by default).
    """
    sizes = [g.shape[1] for g in grads]
    d = sum(sizes)
    norm = jnp.float32(1.0 / math.sqrt(d))
    if projector.kind == "identity":
        return jnp.concatenate([g.astype(jnp.float32) for g in grads], axis=1) * norm
    dtype = jnp.dtype(projector.dtype)
    rows = projector.rows_per_block(d, grads[0].shape[0])
    num_cols = projector.proj_dim if num_cols is None else num_cols
    acc = jnp.zeros((grads[0].shape[0], num_cols), jnp.float32)
    offset = 0
    for i, g in enumerate(grads):
        g = g.astype(dtype)
        cached = None if cache is None else cache[i]
        acc = acc + _project_leaf(projector, key, g, offset, rows, cached, col_start, num_cols)
        offset += sizes[i]
    return acc * norm
