"""XᵀX and its inverse sharded by rows over every device of every process (large proj_dim).

The host path (:func:`trax_attr.engine.inverse_gram`) holds the whole ``(k, k)`` XᵀX on
every host and factorises it in float64: about 40 k² bytes (43 GB at k = 32,768). Here
each of the D devices of a 1-D mesh (:func:`solve_mesh`: the TRAKer's devices, or with
several processes every device of every process, process by process) holds K / D rows:

* :func:`accumulate`: per chunk of training rows (each process brings its own rows, split
  over its devices), every device all-gathers the chunk ``(c, K)`` and adds its rows of
  the chunk's ΦᵀΦ (:func:`~trax_attr.engine.linalg.gram_rows`) to its block, in place.
* :func:`regularize`, :func:`diagonal`: λ on the diagonal, and the diagonal for "auto".
* :func:`invert`: block Gauss-Jordan elimination in place. Per pivot block of b rows,
  its owner's rows are broadcast (one ``psum`` of ``(b, K)``), every device inverts the
  ``(b, b)`` pivot (:func:`~trax_attr.engine.linalg.pivot_inverse`, scalar sweeps) and
  updates its own rows
  (:func:`~trax_attr.engine.linalg.sweep_rows`): 2 K³ / D flops per device, memory K²/D
  plus ``(b, K)`` panels.
* :func:`fetch`, :func:`from_rows`: the real ``(k, k)`` to / from host rows.

K is k padded to a multiple of D·b with identity rows (they stay identity and do not
touch the real block). Precision: the dtype of the accumulator, float32 unless the user
turned on ``jax_enable_x64``; matmuls at HIGHEST precision (no bf16 passes on TPU).
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..engine import linalg
from .hosts import process_allgather
from .mesh import round_up

__all__ = ["GRAM_AXIS", "Layout", "layout", "solve_mesh", "zeros", "rows_array",
           "accumulate", "regularize", "diagonal", "invert", "scale", "row_abs_sums",
           "lambda_of", "inverse", "inverse_in_jit", "fetch", "from_rows"]

GRAM_AXIS = "gram"
_ROWS = P(GRAM_AXIS, None)
_BLOCK = 256


class Layout(NamedTuple):
    """How a ``(k, k)`` matrix lies on the mesh: ``(padded, padded)``, ``padded / devices``
    rows per device, pivot blocks of ``block`` rows (``block`` divides the rows per device)."""

    k: int
    padded: int
    block: int
    devices: int

    @property
    def rows(self) -> int:
        return self.padded // self.devices


def layout(k: int, devices: int, block: int = _BLOCK) -> Layout:
    """The :class:`Layout` of a ``(k, k)`` matrix over ``devices`` devices."""
    b = max(1, min(int(block), -(-int(k) // int(devices))))
    return Layout(int(k), round_up(k, devices * b), b, int(devices))


def solve_mesh(mesh: Mesh) -> Mesh:
    """The 1-D mesh (axis ``"gram"``) the sharded solve runs on: with one process the
    devices of ``mesh``; with several, every device of every process, process by process
    (each process's rows of the matrix are then contiguous)."""
    if jax.process_count() == 1:
        devices = list(mesh.devices.flat)
    else:
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
        counts = {d.process_index: 0 for d in devices}
        for d in devices:
            counts[d.process_index] += 1
        if len(set(counts.values())) != 1:
            raise ValueError(f"the sharded solve needs as many devices on every process, got "
                             f"{counts}; start every process with the same device count.")
    return Mesh(np.array(devices), (GRAM_AXIS,))


def _local_devices(mesh: Mesh) -> list:
    """This process's devices of a :func:`solve_mesh`, with their positions in it."""
    return [(i, d) for i, d in enumerate(mesh.devices.flat)
            if d.process_index == jax.process_index()]


@functools.partial(jax.jit, static_argnames=("mesh", "lay", "dtype"))
def zeros(mesh: Mesh, lay: Layout, dtype) -> jax.Array:
    """A ``(K, K)`` zero accumulator, rows sharded."""
    return jax.lax.with_sharding_constraint(jnp.zeros((lay.padded, lay.padded), dtype),
                                            NamedSharding(mesh, _ROWS))


def rows_array(block: np.ndarray, mesh: Mesh) -> jax.Array:
    """A global ``(sum of c, k)`` array of every process's ``block (c, k)`` (c a multiple
    of its devices on the mesh, equal on every process), rows split over the mesh."""
    count = len(_local_devices(mesh))
    if block.shape[0] % count:
        raise ValueError(f"a chunk of {block.shape[0]} rows does not split over {count} "
                         "devices; pad it to a multiple.")
    shape = (block.shape[0] * jax.process_count(),) + block.shape[1:]
    return jax.make_array_from_process_local_data(NamedSharding(mesh, _ROWS), block, shape)


@functools.partial(jax.jit, static_argnames=("mesh", "lay"), donate_argnums=0)
def accumulate(acc: jax.Array, x: jax.Array, mesh: Mesh, lay: Layout) -> jax.Array:
    """``acc (K, K)`` + xᵀx of a chunk ``x (R, k)`` (zero rows allowed), both rows-sharded.

    Per device: ``acc (K / D, K)``, ``x (R / D, k)``; the chunk is all-gathered
    ``(R, K)`` (zero columns past k), the device's rows of its product added in place.
    """
    def kernel(acc, x):
        full = jax.lax.all_gather(x, GRAM_AXIS, tiled=True)
        full = jnp.pad(full, ((0, 0), (0, lay.padded - full.shape[1])))
        row0 = jax.lax.axis_index(GRAM_AXIS) * lay.rows
        return linalg.gram_rows(acc, full, row0, lay.block)

    return jax.shard_map(kernel, mesh=mesh, in_specs=(_ROWS, _ROWS), out_specs=_ROWS)(acc, x)


def _diagonal_index(lay: Layout):
    """(local row numbers, their global rows) of this device's block."""
    local = jnp.arange(lay.rows)
    return local, jax.lax.axis_index(GRAM_AXIS) * lay.rows + local


def _gather_rows(values: jax.Array, lay: Layout) -> jax.Array:
    """``(K,)`` on every device from each device's ``values (K / D,)`` (a psum, so the
    result is known to be replicated)."""
    row0 = jax.lax.axis_index(GRAM_AXIS) * lay.rows
    whole = jax.lax.dynamic_update_slice_in_dim(
        jnp.zeros((lay.padded,), values.dtype), values, row0, axis=0)
    return jax.lax.psum(whole, GRAM_AXIS)


@functools.partial(jax.jit, static_argnames=("mesh", "lay"), donate_argnums=0)
def regularize(acc: jax.Array, lam: jax.Array, mesh: Mesh, lay: Layout) -> jax.Array:
    """``acc + λI`` on the real diagonal, 1 on the padded one (its rows are zero)."""
    def kernel(acc, lam):
        local, rows = _diagonal_index(lay)
        add = jnp.where(rows < lay.k, lam.astype(acc.dtype), jnp.ones((), acc.dtype))
        return acc.at[local, rows].add(add)

    return jax.shard_map(kernel, mesh=mesh, in_specs=(_ROWS, P()), out_specs=_ROWS)(acc, lam)


@functools.partial(jax.jit, static_argnames=("mesh", "lay"))
def diagonal(acc: jax.Array, mesh: Mesh, lay: Layout) -> jax.Array:
    """The diagonal ``(K,)`` of ``acc``, on every device."""
    def kernel(acc):
        local, rows = _diagonal_index(lay)
        return _gather_rows(acc[local, rows], lay)

    return jax.shard_map(kernel, mesh=mesh, in_specs=_ROWS, out_specs=P())(acc)


@functools.partial(jax.jit, static_argnames=("mesh", "lay"), donate_argnums=0)
def invert(acc: jax.Array, mesh: Mesh, lay: Layout):
    """``(M⁻¹ (K, K) rows-sharded, min diag L, max diag L)`` of a positive definite
    ``acc`` = M = L Lᵀ, in place, by block Gauss-Jordan (see the module docstring). A
    matrix that is not positive definite in ``acc.dtype`` gives NaN."""
    b, per = lay.block, lay.rows // lay.block

    def kernel(local):
        me = jax.lax.axis_index(GRAM_AXIS)

        def step(j, carry):
            local, low, high = carry
            start = j * b
            mine = j // per == me
            offset = jnp.where(mine, start - me * lay.rows, 0)
            piece = jax.lax.dynamic_slice_in_dim(local, offset, b, axis=0)
            rows = jax.lax.psum(jnp.where(mine, piece, jnp.zeros_like(piece)), GRAM_AXIS)
            d = jax.lax.dynamic_slice_in_dim(rows, start, b, axis=1)
            pinv, diag = linalg.pivot_inverse(d)
            local = linalg.sweep_rows(local, rows, pinv, start, b)
            # the pivot rows become P R, with R[:, J] = I
            eye = jax.lax.dynamic_update_slice_in_dim(rows, jnp.eye(b, dtype=rows.dtype),
                                                      start, axis=1)
            new = jnp.matmul(pinv, eye, precision=jax.lax.Precision.HIGHEST)
            local = jax.lax.cond(
                mine, lambda m: jax.lax.dynamic_update_slice_in_dim(m, new, offset, axis=0),
                lambda m: m, local)
            return local, jnp.minimum(low, diag.min()), jnp.maximum(high, diag.max())

        inf = jnp.asarray(jnp.inf, local.dtype)
        return jax.lax.fori_loop(0, lay.padded // b, step, (local, inf, -inf))

    return jax.shard_map(kernel, mesh=mesh, in_specs=_ROWS,
                         out_specs=(_ROWS, P(), P()))(acc)


@functools.partial(jax.jit, static_argnames=("mesh", "lay"))
def row_abs_sums(a: jax.Array, mesh: Mesh, lay: Layout) -> jax.Array:
    """Σ_j |a[i, j]| over the real columns, ``(K,)`` on every device (padded rows: 0)."""
    def kernel(a):
        _, rows = _diagonal_index(lay)
        sums = jnp.where(rows < lay.k, jnp.abs(a[:, :lay.k]).sum(axis=1), 0)
        return _gather_rows(sums, lay)

    return jax.shard_map(kernel, mesh=mesh, in_specs=_ROWS, out_specs=P())(a)


@functools.partial(jax.jit, static_argnames=("mesh",), donate_argnums=0)
def scale(a: jax.Array, factor: jax.Array, mesh: Mesh) -> jax.Array:
    return jax.shard_map(lambda a, f: a * f.astype(a.dtype), mesh=mesh,
                         in_specs=(_ROWS, P()), out_specs=_ROWS)(a, factor)


def _host(x: jax.Array) -> np.ndarray:
    """A replicated array's value on this host."""
    return np.asarray(x.addressable_shards[0].data)


def lambda_of(acc: jax.Array, n: int, lambda_reg, mesh: Mesh, lay: Layout) -> jax.Array:
    """λ ``()`` for the sharded XᵀX ``acc`` of n rows, as
    :func:`~trax_attr.engine.resolve_lambda` (auto: 0.75 · trace / n, the trace summed on
    the devices in ``acc.dtype``). Traceable: the eager and the in-jit solve share it."""
    lambda_reg = linalg.check_lambda(lambda_reg)
    if lambda_reg != linalg.AUTO:
        return jnp.asarray(lambda_reg, acc.dtype)
    trace = jnp.sum(diagonal(acc, mesh, lay)[:lay.k])
    return jnp.where(trace > 0, linalg.AUTO_SCALE * trace / n, 0).astype(acc.dtype)


def _fail_singular(value: float, dtype, lay: Layout, mean_diagonal: float) -> str:
    return (linalg.singular_message(value) + f" in {np.dtype(dtype).name} (the sharded solve, "
            f"proj_dim={lay.k}), which has no pseudo-inverse fallback. Set lambda_reg > 0 "
            f"(e.g. 'auto', or 1e-3 × the mean diagonal of XᵀX, {mean_diagonal:.3g} here), "
            "featurize more training examples than proj_dim, or use solve='host' if k x k "
            "float64 fits in host memory.")


@functools.partial(jax.jit, static_argnames=("n", "lambda_reg", "mesh", "lay"),
                   donate_argnums=0)
def _solve(acc, n, lambda_reg, mesh, lay):
    """(A, λ, min diag L, max diag L, mean diagonal of XᵀX) of the sharded XᵀX."""
    value = lambda_of(acc, n, lambda_reg, mesh, lay)
    mean_diagonal = jnp.mean(diagonal(acc, mesh, lay)[:lay.k])
    a, low, high = invert(regularize(acc, value, mesh, lay), mesh, lay)
    return a, value, low, high, mean_diagonal


def _rescale(a, mesh, lay):
    """a / mean|a| over the real block (traker's rescaling)."""
    total = jnp.sum(row_abs_sums(a, mesh, lay))
    return scale(a, (lay.k * lay.k / total).astype(a.dtype), mesh)


def inverse(acc: jax.Array, n: int, lambda_reg, mesh: Mesh, lay: Layout, *,
            traker_inverse_rescale: bool = False) -> tuple[jax.Array, float]:
    """``(A (K, K) rows-sharded, λ)``: A = (G + λI)⁻¹ of the sharded XᵀX ``acc`` of n
    rows (donated: its memory becomes A's), λ from :func:`lambda_of`. Warns as the host
    path does when ill conditioned; a matrix that is not positive definite raises
    ValueError (no pseudo-inverse here: it would need the whole matrix on one host).
    :func:`inverse_in_jit` is its traceable twin (same kernels, same λ)."""
    lambda_reg = linalg.check_lambda(lambda_reg)
    a, value, low, high, mean_diagonal = _solve(acc, int(n), lambda_reg, mesh, lay)
    value, low, high, mean_diagonal = (float(_host(x)) for x in (value, low, high,
                                                                 mean_diagonal))
    if not (np.isfinite(low) and low > 0):
        raise ValueError(_fail_singular(value, a.dtype, lay, mean_diagonal))
    linalg.condition_warning(low, high, value, mean_diagonal, stacklevel=3)
    if traker_inverse_rescale:
        a = _rescale(a, mesh, lay)
    return a, value


def inverse_in_jit(acc: jax.Array, n: int, lambda_reg, mesh: Mesh, lay: Layout, *,
                   traker_inverse_rescale: bool = False) -> tuple[jax.Array, jax.Array]:
    """:func:`inverse` as a traceable function (for the functional core inside ``jit``).
    Ill-conditioning warns (a host callback of four scalars); a matrix that is not
    positive definite warns too, and its A is NaN, instead of raising."""
    dtype = acc.dtype
    a, value, low, high, mean_diagonal = _solve(acc, int(n), linalg.check_lambda(lambda_reg),
                                                mesh, lay)

    def check(low, high, value, mean_diagonal):
        low, high, value, mean_diagonal = (float(x) for x in (low, high, value,
                                                             mean_diagonal))
        if not (np.isfinite(low) and low > 0):
            warnings.warn(_fail_singular(value, dtype, lay, mean_diagonal) + " Its scores "
                          "are NaN.", linalg.IllConditionedWarning, stacklevel=2)
        else:
            linalg.condition_warning(low, high, value, mean_diagonal, stacklevel=2)

    jax.debug.callback(check, low, high, value, mean_diagonal)
    if traker_inverse_rescale:
        a = _rescale(a, mesh, lay)
    return a, value


def fetch(a: jax.Array, lay: Layout, mesh: Mesh, *, everywhere: bool = False
          ) -> np.ndarray | None:
    """The real ``(k, k)`` block of a rows-sharded ``a`` on the host of process 0 (of every
    process with ``everywhere``; None elsewhere), one device's rows at a time."""
    first = everywhere or jax.process_index() == 0
    out = np.empty((lay.k, lay.k), a.dtype) if first else None
    shards = sorted(a.addressable_shards, key=lambda s: s.index[0].start or 0)

    def place(position, rows):
        start = position * lay.rows
        stop = min(start + lay.rows, lay.k)
        if start < stop:
            out[start:stop] = rows[:stop - start, :lay.k]

    if jax.process_count() == 1:
        for position, shard in enumerate(shards):
            place(position, np.asarray(shard.data))
        return out
    local = len(shards)
    for i, shard in enumerate(shards):
        gathered = process_allgather(np.asarray(shard.data))   # (processes, K / D, K)
        if first:
            for process in range(gathered.shape[0]):
                place(process * local + i, gathered[process])
        del gathered
    return out


def from_rows(read, lay: Layout, mesh: Mesh, dtype) -> jax.Array:
    """A rows-sharded ``(K, K)`` from ``read(start, stop) (r, k)``, the rows of a stored
    ``(k, k)`` matrix; each process reads only its own devices' rows."""
    blocks = []
    for position, device in _local_devices(mesh):
        start = position * lay.rows
        stop = min(start + lay.rows, lay.k)
        block = np.zeros((lay.rows, lay.padded), dtype)
        if start < stop:
            block[:stop - start, :lay.k] = read(start, stop)
        blocks.append(jax.device_put(block, device))
    return jax.make_array_from_single_device_arrays(
        (lay.padded, lay.padded), NamedSharding(mesh, _ROWS), blocks)
