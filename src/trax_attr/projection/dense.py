"""Dense projections φ = Pᵀ g / √d, with P generated block by block from the key.

P (d, k) for checkpoint m is a pure function of ``key = fold_in(key(seed), m)`` and of the
entry's (row, column) (:mod:`.generators`), so it is the same matrix on every backend, for
every batch size, block size and device count, and any block of it can be made inside
``jit`` without the rest.

Two ways to apply it, the same matrix either way:

* kept (default when P fits ``max_cache_bytes``, 1 GiB): :meth:`DenseProjector.cache`
  makes P once per checkpoint, split by parameter leaf, and every batch costs one dot per
  leaf. A hashed entry costs as much as hundreds of multiply-adds on a CPU with a fast
  bfloat16 dot, so at batches of a few hundred regenerating P would cost more than the
  product itself.
* regenerated (P too large to keep): block by block inside the featurize kernel, each
  block multiplied into the gradient's matching rows before the next is made, so neither
  P nor the ``(B, d)`` gradient is ever formed whole.

Kinds:

* :func:`rademacher`: P_ij = ±1 with equal probability (exact in bfloat16);
* :func:`normal`: P_ij ~ N(0, 1);
* :func:`identity`: no projection, P = I and k = d; always float32.

``dtype`` is the compute dtype of the projection matmul: the gradient is rounded to it,
products are exact and accumulation is float32. bfloat16 is the fast path; float32 the
exact one. A kept bfloat16 P is stored in float32 on CPUs without a native bfloat16 dot
(no AVX512-BF16 or AMX): the rounded gradient times P is then the same product, computed
at the machine's faster float32 rate (:func:`storage_dtype`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..gradients import per_example_grads
from .base import LayerInfo, check_compute_dtype, check_positive_int, inverse_sqrt
from .generators import GENERATORS, matrix_block as _matrix_block

__all__ = ["DenseProjector", "IdentityProjector", "rademacher", "normal", "identity",
           "storage_dtype", "DEFAULT_MAX_CACHE_BYTES"]

# Rows of P generated per block when P is regenerated: 16 per example of the batch, at
# least 1024 and at most 16M entries. The block is written, then read by the dot: at small
# batches it should stay in the caches, at large ones the dot wants a long contraction.
# Measured on 2 cores (bfloat16, k 512 to 8192): batch 32 to 128 run fastest at about 1024
# rows, batch 256 at about 4096 and batch 1024 with the whole leaf as one block.
_MIN_BLOCK_ROWS = 1024
_ROWS_PER_EXAMPLE = 16
_MAX_BLOCK_ENTRIES = 1 << 24
# P kept per checkpoint up to this many bytes (in its storage dtype): d·k up to 5e8 in
# bfloat16 (d = 260k at k = 2048), half that where it is stored in float32.
DEFAULT_MAX_CACHE_BYTES = 1 << 30
# CPU flags of a native bfloat16 dot (x86: AVX512-BF16 or AMX; Arm: BF16)
_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def _cpu_has_bf16_dot() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return any(flag in line.split() for flag in _BF16_FLAGS)
    return False


def storage_dtype(compute_dtype, platform: str | None = None) -> np.dtype:
    """The dtype a kept P is stored in for ``compute_dtype`` on ``platform`` (default:
    JAX's default backend): the compute dtype, except bfloat16 and float16 on CPUs
    without a native bfloat16 dot, where float32 holds the same values and multiplies
    faster (measured on AMD Zen 3: bf16 inputs 38, f32 47 GFLOP per CPU-second)."""
    dtype = jnp.dtype(compute_dtype)
    platform = jax.default_backend() if platform is None else platform
    if dtype == jnp.float32 or platform != "cpu" or _cpu_has_bf16_dot():
        return dtype
    return jnp.dtype(jnp.float32)


class _GradientProjector:
    """What projectors of per-example gradients share: φ of a batch inside jit is the
    projection of the batch's per-example gradients, one parameter leaf at a time."""

    needs_layers = False

    def layer_info(self, f, checkpoint, example) -> LayerInfo:
        return LayerInfo(f.selection.grad_dim)

    def features(self, f, checkpoint, batch, *, col_start=0, num_cols=None):
        grads = per_example_grads(f.task, f.model, f.selection, checkpoint.selected,
                                  checkpoint.rest, checkpoint.state, batch)
        return self.project(checkpoint.key, grads, checkpoint.cache, col_start=col_start,
                            num_cols=num_cols)


@dataclasses.dataclass(frozen=True)
class DenseProjector(_GradientProjector):
    """A random ±1 or N(0, 1) projection to ``proj_dim`` columns. Hashable (jit-static).

    Attributes:
      distribution: ``"rademacher"`` or ``"normal"``.
      proj_dim: k.
      dtype: name of the compute dtype of the matmul (``"bfloat16"`` or ``"float32"``).
      block_rows: rows of P generated at once (``None``: sized to the batch).
      max_cache_bytes: largest P, in bytes of its :func:`storage_dtype`, kept per
        checkpoint instead of regenerated per batch (default 1 GiB; 0: always regenerate).
      generator: ``"hash"``, ``"threefry"`` or ``"rbg"`` (see :mod:`.generators`).
    """

    distribution: str
    proj_dim: int
    dtype: str = "bfloat16"
    block_rows: int | None = None
    max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES
    generator: str = "hash"

    @property
    def splittable(self) -> bool:
        return True

    def output_dim(self, layers: LayerInfo) -> int:
        return int(self.proj_dim)

    def describe(self) -> dict[str, Any]:
        # block_rows and the cache change how P is made, not P: a store may change them
        return {"kind": self.distribution, "proj_dim": int(self.proj_dim),
                "dtype": self.dtype, "generator": self.generator}

    def rows_per_block(self, grad_dim: int, batch: int = 1) -> int:
        """Rows of P generated at once for a batch of ``batch`` examples."""
        if self.block_rows is not None:
            return int(self.block_rows)
        most = max(_MIN_BLOCK_ROWS, _MAX_BLOCK_ENTRIES // int(self.proj_dim))
        return min(max(_MIN_BLOCK_ROWS, _ROWS_PER_EXAMPLE * batch), most)

    def matrix_block(self, key, row_start, num_rows: int, col_start=0,
                     num_cols: int | None = None) -> jax.Array:
        """Rows ``[row_start, row_start + num_rows)`` of P -> ``(num_rows, num_cols)``."""
        return _matrix_block(self.distribution, self.generator, self.dtype, self.proj_dim,
                             key, row_start, num_rows, col_start, num_cols)

    def materialize(self, key, grad_dim: int) -> jax.Array:
        return self.matrix_block(key, 0, grad_dim)

    def cache_bytes(self, grad_dim: int) -> int:
        """Bytes of P ``(d, k)`` kept in its :func:`storage_dtype`."""
        return int(grad_dim) * int(self.proj_dim) * storage_dtype(self.dtype).itemsize

    def cache(self, key, leaf_sizes: tuple[int, ...]):
        """P split by parameter leaf, ``((size_l, k), ...)`` in :func:`storage_dtype`, or
        ``None`` when it exceeds ``max_cache_bytes`` (then :meth:`project` regenerates
        blocks per batch). Made by one jitted program, compiled once per leaf layout."""
        sizes = tuple(int(s) for s in leaf_sizes)
        if self.cache_bytes(sum(sizes)) > self.max_cache_bytes:
            return None
        return _build_cache(self, storage_dtype(self.dtype).name, key, sizes)

    def project(self, key, grads, cache=None, *, col_start=0, num_cols=None):
        """φ = Pᵀ g / √d ``(B, num_cols) f32`` of gradients ``((B, size_l), ...)``.

        Args:
          key: the checkpoint's key, :func:`~trax_attr.projection_key`.
          grads: the per-example gradient split by parameter leaf; d = Σ size_l. The
            ``(B, d)`` gradient is never concatenated.
          cache: optional :meth:`cache` of the same key and leaf sizes (only the columns
            ``col_start + [0, num_cols)`` of it when those are given: a proj-sharded
            kernel receives the cache column-sliced).
          col_start, num_cols: only these columns of φ (``col_start`` may be traced); this
            is how proj_dim is split over devices. Default: all k.
        """
        sizes = [g.shape[1] for g in grads]
        d = sum(sizes)
        dtype = jnp.dtype(self.dtype)
        if cache is not None:
            return _dot_leaves(grads, cache, dtype) * inverse_sqrt(d)
        rows = self.rows_per_block(d, grads[0].shape[0])
        num_cols = int(self.proj_dim) if num_cols is None else num_cols
        acc = None
        offset = 0
        for g, size in zip(grads, sizes):
            part = self._project_leaf(key, g.astype(dtype), offset, rows, col_start, num_cols)
            acc = part if acc is None else acc + part
            offset += size
        return acc * inverse_sqrt(d)

    def _project_leaf(self, key, g, offset: int, rows: int, col_start, num_cols):
        """g (B, size) @ P[offset:offset+size, cols] -> (B, num_cols) f32, one generated
        block of rows at a time.

        Blocking also keeps each matmul's contraction short, which XLA's CPU dot runs
        markedly faster (measured: 2x at d = 1M) than one dot over the whole leaf.
        """
        size = g.shape[1]
        full, rem = divmod(size, rows)

        def product(i, num):
            g_block = jax.lax.dynamic_slice_in_dim(g, i * rows, num, axis=1)
            block = self.matrix_block(key, offset + i * rows, num, col_start, num_cols)
            return _dot(g_block, block)

        # The sum starts from a product with g, not from zeros: inside shard_map the
        # loop's carry must vary over the devices exactly as g does.
        acc = product(0, rows) if full else product(0, rem)
        if full > 1:
            acc = jax.lax.fori_loop(1, full, lambda i, acc: acc + product(i, rows), acc)
        if full and rem:
            acc = acc + _dot(g[:, full * rows:],
                             self.matrix_block(key, offset + full * rows, rem, col_start,
                                               num_cols))
        return acc


def _dot(x, p):
    """x (B, s) @ p (s, c) -> (B, c) f32; float32 inputs at full float32 precision (the
    exact path, also on accelerators whose default f32 dot rounds its inputs)."""
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    return jnp.dot(x, p, preferred_element_type=jnp.float32, precision=precision)


def _dot_leaves(grads, cache, dtype):
    """Σ_l round(g_l) @ P_l ``(B, c) f32``: one dot per leaf with the kept blocks of P.

    The gradient is rounded to the compute ``dtype`` first, then widened to the storage
    dtype of P if that differs (float32 on CPUs without a bfloat16 dot): exact products
    of the same bfloat16 values either way.
    """
    acc = None
    for g, p in zip(grads, cache):
        x = g.astype(dtype)
        if x.dtype != p.dtype:
            x = x.astype(p.dtype)
        part = _dot(x, p)
        acc = part if acc is None else acc + part
    return acc


@jax.jit(static_argnums=(0, 1, 3))
def _build_cache(projector: DenseProjector, stored: str, key, leaf_sizes):
    offsets = np.cumsum((0,) + leaf_sizes)
    # generated in the compute dtype (normal entries rounded to it), then stored
    return tuple(projector.matrix_block(key, int(offsets[i]), size).astype(stored)
                 for i, size in enumerate(leaf_sizes))


@dataclasses.dataclass(frozen=True)
class IdentityProjector(_GradientProjector):
    """No projection: φ = g / √d, k = d, float32. Exact, for small models and parity."""

    @property
    def splittable(self) -> bool:
        return False

    def output_dim(self, layers: LayerInfo) -> int:
        return int(layers.grad_dim)

    def describe(self) -> dict[str, Any]:
        return {"kind": "identity"}

    def materialize(self, key, grad_dim: int) -> jax.Array:
        return jnp.eye(grad_dim, dtype=jnp.float32)

    def cache(self, key, leaf_sizes):
        return None

    def project(self, key, grads, cache=None, *, col_start=0, num_cols=None):
        if num_cols is not None:
            raise ValueError("the identity projector's columns cannot be split over devices; "
                             "use a mesh without a 'proj' axis.")
        d = sum(g.shape[1] for g in grads)
        return jnp.concatenate([g.astype(jnp.float32) for g in grads], axis=1) * inverse_sqrt(d)


def _dense(distribution, proj_dim, dtype, block_rows, max_cache_bytes, generator):
    proj_dim = check_positive_int("proj_dim", proj_dim,
                                  "TRAK uses 512 to 8192 (2048 is a good default).")
    name = check_compute_dtype(dtype)
    if block_rows is not None:
        block_rows = check_positive_int("block_rows", block_rows, "or None (automatic).")
    if isinstance(max_cache_bytes, bool) or not isinstance(max_cache_bytes, (int, np.integer)) \
            or max_cache_bytes < 0:
        raise ValueError(
            f"max_cache_bytes must be a non-negative integer, got {max_cache_bytes!r}; "
            "0 turns the cache off."
        )
    if generator not in GENERATORS:
        raise ValueError(f"generator={generator!r} is not known; use one of {list(GENERATORS)} "
                         "('hash' is the fastest on CPUs).")
    return DenseProjector(distribution, proj_dim, name, block_rows, int(max_cache_bytes),
                          generator)


def rademacher(proj_dim: int, *, dtype=jnp.bfloat16, block_rows: int | None = None,
               max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
               generator: str = "hash") -> DenseProjector:
    """±1 projection to ``proj_dim`` dimensions (the TRAK default)."""
    return _dense("rademacher", proj_dim, dtype, block_rows, max_cache_bytes, generator)


def normal(proj_dim: int, *, dtype=jnp.bfloat16, block_rows: int | None = None,
           max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
           generator: str = "hash") -> DenseProjector:
    """Standard normal projection to ``proj_dim`` dimensions."""
    return _dense("normal", proj_dim, dtype, block_rows, max_cache_bytes, generator)


def identity() -> IdentityProjector:
    """No projection: φ = g / √d, k = d. Exact, for small models and parity tests."""
    return IdentityProjector()
