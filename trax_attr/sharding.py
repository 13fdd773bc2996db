"""Meshes, shard_map kernels and multi-host helpers: one code path for 1 device and many.

Every device computation of the TRAKer runs through a kernel here, data-parallel over a
:class:`jax.sharding.Mesh` with :func:`jax.shard_map`:

* featurize: each device takes ``B / D`` examples of the batch (padded to a multiple of the
  device count D) and computes their per-example gradients and projections; the
  parameters and the projection key are replicated. P is a counter hash of (key, row,
  column), so it is the same matrix on any number of devices.
* XᵀX: each device multiplies its ``c / D`` rows, then ``psum`` over the mesh.
* solve and score: training rows are sharded over the mesh's first axis (targets over the
  second axis of a 2-D mesh); top-k keeps the k strongest rows per target per shard, then
  merges, so no ``(n_train, n_targets)`` matrix is ever formed.

Several hosts (processes started with :func:`jax.distributed.initialize`) share one store:
each featurizes its own rows (:func:`process_rows`), then ``finalize_features`` sums the
per-process XᵀX with :func:`process_sum`, an exact all-gather of the bytes summed in
process order, so every process holds the bit-identical matrix. The streaming loops read
the store in chunks of ``chunk_rows`` rows, so memory is bounded by the chunk, not n_train.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["DATA_AXIS", "PROJ_AXIS", "TopK", "batch_shards", "default_mesh", "check_mesh", "pad_batch", "shard_featurize",
           "gram_rows", "solve_rows", "score_rows", "topk_rows", "merge_topk", "process_rows",
           "process_sum", "barrier", "stream_gram", "stream_solve", "stream_scores"]

DATA_AXIS = "data"
PROJ_AXIS = "proj"
_HIGHEST = jax.lax.Precision.HIGHEST


class TopK(NamedTuple):
    """The k strongest proponents and opponents of each target.

    Attributes:
      proponents: ``(n_targets, k) int64`` training rows with the largest scores, best first.
      proponent_scores: ``(n_targets, k) f32`` their scores, descending.
      opponents: ``(n_targets, k) int64`` training rows with the most negative scores.
      opponent_scores: ``(n_targets, k) f32`` their scores, ascending.
    """

    proponents: np.ndarray
    proponent_scores: np.ndarray
    opponents: np.ndarray
    opponent_scores: np.ndarray


def default_mesh(devices=None) -> Mesh:
    """A 1-D mesh (axis ``"data"``) over ``devices``; all of this process's devices by default.

    The default is local on purpose: in a multi-host run each process featurizes its own
    rows on its own devices, and only XᵀX crosses processes (:func:`process_sum`).
    """
    devices = jax.local_devices() if devices is None else list(devices)
    return Mesh(np.array(devices), (DATA_AXIS,))


def check_mesh(mesh) -> Mesh:
    """``mesh`` if it is a usable Mesh of this process's devices, else a ValueError/TypeError."""
    if mesh is None:
        return default_mesh()
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"mesh must be a jax.sharding.Mesh or None (all local devices), got "
            f"{type(mesh).__name__}. Build one with jax.make_mesh((jax.local_device_count(),), "
            "('data',)).")
    if mesh.devices.ndim not in (1, 2):
        raise ValueError(
            f"mesh has {mesh.devices.ndim} axes {mesh.axis_names}; expected 1 (training rows and "
            "batches) or 2 (rows, targets).")
    local = set(jax.local_devices())
    foreign = [d for d in mesh.devices.flat if d not in local]
    if foreign:
        raise ValueError(
            f"mesh holds devices of other processes ({foreign[:4]}); the TRAKer's mesh must be "
            "this process's devices (jax.local_devices()); hosts combine XᵀX through the store.")
    return mesh


def _rows_spec(mesh: Mesh) -> P:
    """Leading axis split over every mesh axis: batches and XᵀX use all devices."""
    return P(tuple(mesh.axis_names))


def pad_batch(batch: tuple, multiple: int) -> tuple:
    """Pad every array's leading axis to a multiple of ``multiple`` by repeating row 0.

    Repeating a real example keeps the padded rows finite; their outputs are dropped.
    """
    size = np.shape(batch[0])[0]
    extra = -size % multiple
    if extra == 0:
        return batch
    take = np.concatenate([np.arange(size), np.zeros(extra, np.int64)])
    return tuple(np.asarray(a)[take] for a in batch)


def batch_shards(mesh: Mesh) -> int:
    """How many slices a featurize batch is cut into: devices not on the ``"proj"`` axis."""
    return mesh.size // mesh.shape.get(PROJ_AXIS, 1)


def shard_featurize(fn: Callable, mesh: Mesh, proj_dim: int | None = None) -> Callable:
    """jit(shard_map(fn)): ``fn(selected, rest, state, key, cache, batch)`` data-parallel.

    Per shard: ``batch`` leaves ``(B / D, ...)``, everything else replicated; the outputs
    ``(B / D, k)`` and ``(B / D,)`` are concatenated back to ``(B, k)``, ``(B,)``. B must be
    a multiple of D = :func:`batch_shards` (:func:`pad_batch`).

    With a mesh axis named ``"proj"`` (e.g. ``jax.make_mesh((4, 2), ("data", "proj"))``),
    proj_dim is split over it too: each device computes the gradients of its batch slice
    and the ``proj_dim / P`` columns of φ of its ``"proj"`` index, generating only those
    columns of the projection matrix (for large proj_dim). ``fn`` must then accept
    ``col_start`` and ``num_cols`` (as :func:`~trax_attr.features.featurize_fn` does) and
    ``cache`` is split by columns.
    """
    names = tuple(mesh.axis_names)
    batch_axes = tuple(a for a in names if a != PROJ_AXIS)
    rows = P(batch_axes)
    columns = None
    if PROJ_AXIS in names:
        parts = mesh.shape[PROJ_AXIS]
        if proj_dim is None or proj_dim % parts:
            raise ValueError(
                f"proj_dim={proj_dim} must be a multiple of the mesh's {PROJ_AXIS!r} axis "
                f"({parts} devices) to split the projection over it; change proj_dim or the "
                "mesh.")
        columns = proj_dim // parts

    def kernel(selected, rest, state, key, cache, batch):
        # Mark the replicated parameters as varying over the batch axes: otherwise the
        # transpose of their broadcast psums each per-example gradient over the devices
        # (the gradient of a replicated value is the sum over its copies).
        selected = jax.tree.map(lambda a: jax.lax.pcast(a, batch_axes, to="varying"),
                                selected)
        if columns is None:
            return fn(selected, rest, state, key, cache, batch)
        start = jax.lax.axis_index(PROJ_AXIS) * columns
        return fn(selected, rest, state, key, cache, batch, col_start=start, num_cols=columns)

    if columns is None:
        in_specs, out_specs = (P(), P(), P(), P(), P(), rows), rows
    else:
        in_specs = (P(), P(), P(), P(), P(None, PROJ_AXIS), rows)
        out_specs = (P(batch_axes, PROJ_AXIS), rows)
    return jax.jit(jax.shard_map(kernel, mesh=mesh, in_specs=in_specs, out_specs=out_specs))


def _pad_rows(x: np.ndarray, multiple: int) -> np.ndarray:
    extra = -x.shape[0] % multiple
    if extra == 0:
        return x
    return np.concatenate([x, np.zeros((extra,) + x.shape[1:], x.dtype)])


@functools.partial(jax.jit, static_argnames=("mesh",))
def _gram(x, mesh):
    names = tuple(mesh.axis_names)

    def kernel(block):  # (c / D, k) -> (k, k), summed over the mesh
        return jax.lax.psum(jnp.matmul(block.T, block, precision=_HIGHEST), names)

    return jax.shard_map(kernel, mesh=mesh, in_specs=_rows_spec(mesh), out_specs=P())(x)


def gram_rows(x: np.ndarray, mesh: Mesh) -> np.ndarray:
    """XᵀX ``(k, k) f32`` of ``x (c, k) f32``: per-shard products, then psum.

    Zero rows pad c to a multiple of the device count; they add nothing to XᵀX.
    """
    return np.asarray(_gram(_pad_rows(np.asarray(x, np.float32), mesh.size), mesh))


@functools.partial(jax.jit, static_argnames=("mesh",))
def _solve(x, inverse, mesh):
    def kernel(block, a):  # (c / D, k) @ (k, k) -> (c / D, k)
        return jnp.matmul(block, a, precision=_HIGHEST)

    rows = _rows_spec(mesh)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(rows, P()), out_specs=rows)(x, inverse)


def solve_rows(x: np.ndarray, inverse: np.ndarray, mesh: Mesh) -> np.ndarray:
    """Φ·A ``(c, k) f32`` of rows ``x (c, k) f32`` and ``inverse (k, k) f32``, rows sharded."""
    c = x.shape[0]
    padded = _pad_rows(np.asarray(x, np.float32), mesh.size)
    return np.asarray(_solve(padded, np.asarray(inverse, np.float32), mesh))[:c]


def _score_specs(mesh: Mesh):
    """Training rows over the first mesh axis; targets over the second, if any."""
    names = mesh.axis_names
    return names[0], (names[1] if len(names) > 1 else None)


@functools.partial(jax.jit, static_argnames=("mesh",))
def _scores(features, targets, weights, mesh):
    row_axis, target_axis = _score_specs(mesh)

    def kernel(f, t, w):  # f (M, c/R, k), t (M, m/T, k), w (c/R,) -> (c/R, m/T)
        s = jnp.einsum("ack,atk->ct", f, t, precision=_HIGHEST)
        return s * w[:, None]

    return jax.shard_map(kernel, mesh=mesh,
                         in_specs=(P(None, row_axis), P(None, target_axis), P(row_axis)),
                         out_specs=P(row_axis, target_axis))(features, targets, weights)


def _pad_axis(x: np.ndarray, axis: int, multiple: int) -> np.ndarray:
    extra = -x.shape[axis] % multiple
    if extra == 0:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, extra)
    return np.pad(x, pad)


def _score_inputs(features, targets, weights, mesh):
    row_axis, target_axis = _score_specs(mesh)
    rows = mesh.shape[row_axis]
    cols = mesh.shape[target_axis] if target_axis else 1
    return (_pad_axis(np.asarray(features, np.float32), 1, rows),
            _pad_axis(np.asarray(targets, np.float32), 1, cols),
            _pad_axis(np.asarray(weights, np.float32), 0, rows))


def score_rows(features: np.ndarray, targets: np.ndarray, weights: np.ndarray,
               mesh: Mesh) -> np.ndarray:
    """``(c, m) f32`` block Σ_a features[a] · targets[a]ᵀ, times ``weights`` per row.

    Args:
      features: ``(M, c, k) f32`` Φ_a·A_a rows of the M checkpoints.
      targets: ``(M, m, k) f32`` φ_a of the targets.
      weights: ``(c,) f32`` per-row factor (mean Q / M).
      mesh: rows over its first axis, targets over its second (if any).
    """
    c, m = features.shape[1], targets.shape[1]
    return np.asarray(_scores(*_score_inputs(features, targets, weights, mesh), mesh))[:c, :m]


@functools.partial(jax.jit, static_argnames=("mesh", "k"))
def _topk(features, targets, weights, row_start, n_valid, mesh, k):
    row_axis, target_axis = _score_specs(mesh)

    def kernel(f, t, w, start, valid):
        # f (M, c/R, k), t (M, m/T, k), w (c/R,) -> four (m/T, kk) local top-k's
        s = jnp.einsum("ack,atk->tc", f, t, precision=_HIGHEST) * w[None, :]
        local = s.shape[1]
        rows = start + jax.lax.axis_index(row_axis) * local + jnp.arange(local)
        s_hi = jnp.where(rows[None, :] < valid, s, -jnp.inf)
        s_lo = jnp.where(rows[None, :] < valid, -s, -jnp.inf)
        kk = min(k, local)
        hi, hi_i = jax.lax.top_k(s_hi, kk)
        lo, lo_i = jax.lax.top_k(s_lo, kk)
        return hi, rows[hi_i], lo, rows[lo_i]

    out = P(target_axis, row_axis)
    hi, hi_i, lo, lo_i = jax.shard_map(
        kernel, mesh=mesh,
        in_specs=(P(None, row_axis), P(None, target_axis), P(row_axis), P(), P()),
        out_specs=(out, out, out, out))(features, targets, weights, row_start, n_valid)
    return _select(hi, hi_i, k) + _select(lo, lo_i, k)


def _select(values, rows, k):
    kk = min(k, values.shape[1])
    top, where = jax.lax.top_k(values, kk)
    return top, jnp.take_along_axis(rows, where, axis=1)


@functools.partial(jax.jit, static_argnames=("k",))
def merge_topk(running: tuple, block: tuple, k: int) -> tuple:
    """Merge two ``(hi, hi_rows, lo, lo_rows)`` states, each ``(m, ·)``, into the best k."""
    merged = [jnp.concatenate([a, b], axis=1) for a, b in zip(running, block)]
    return _select(merged[0], merged[1], k) + _select(merged[2], merged[3], k)


def topk_rows(features, targets, weights, row_start: int, n_valid: int, mesh: Mesh,
              k: int) -> tuple:
    """Per target, the best ``k`` of the rows ``row_start + [0, c)`` of one block.

    Args as for :func:`score_rows`; rows at or past ``n_valid`` are ignored.

    Returns ``(hi (m, kk) f32, hi_rows (m, kk) i32, lo (m, kk) f32, lo_rows (m, kk) i32)``
    as device arrays, ``lo`` holding negated scores; kk = min(k, rows in the block).
    """
    m = targets.shape[1]
    out = _topk(*_score_inputs(features, targets, weights, mesh), jnp.int32(row_start),
                jnp.int32(n_valid), mesh, int(k))
    return tuple(a[:m] for a in out)


# --- several processes ----------------------------------------------------------------------
def process_rows(n: int, process_index: int | None = None,
                 process_count: int | None = None) -> range:
    """This process's contiguous slice of ``range(n)``; the slices tile it in process order."""
    index = jax.process_index() if process_index is None else int(process_index)
    count = jax.process_count() if process_count is None else int(process_count)
    return range(n * index // count, n * (index + 1) // count)


def process_sum(x: np.ndarray) -> np.ndarray:
    """Σ over processes of a host array, identical on every process; ``x`` itself with one.

    The raw bytes are all-gathered over a mesh of every device of every process (uint32,
    so nothing is rounded on the way) and summed on the host in process order, in ``x``'s
    own dtype: float64 XᵀX stays float64 although device arrays are float32 by default.
    """
    x = np.ascontiguousarray(x)
    if jax.process_count() == 1:
        return x
    raw = x.view(np.uint32) if x.dtype.itemsize % 4 == 0 else None
    if raw is None:
        raise TypeError(f"process_sum needs a 4- or 8-byte dtype, got {x.dtype}.")
    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("hosts",))
    local_count = jax.local_device_count()
    local = np.zeros((local_count,) + raw.shape, np.uint32)
    local[0] = raw
    shape = (len(devices),) + raw.shape
    array = jax.make_array_from_process_local_data(NamedSharding(mesh, P("hosts")), local, shape)
    gathered = jax.jit(lambda a: a, out_shardings=NamedSharding(mesh, P()))(array)
    everything = np.asarray(gathered.addressable_shards[0].data)
    owners = [d.process_index for d in devices]
    total = np.zeros_like(x)
    for process in range(jax.process_count()):
        slot = owners.index(process)
        total += everything[slot].view(x.dtype).reshape(x.shape)
    return total


def barrier() -> None:
    """Wait until every process reaches this point (no-op with one process)."""
    process_sum(np.zeros(1, np.float32))


# --- streaming over the store -----------------------------------------------------------------
def stream_gram(read: Callable[[int, int], np.ndarray], rows: range, k: int, chunk_rows: int,
                mesh: Mesh, dtype=np.float32) -> np.ndarray:
    """XᵀX ``(k, k)`` in ``dtype`` of the rows ``rows`` given by ``read(start, stop) (c, k)``.

    float32: per-chunk sharded products on the devices, summed over chunks in float32.
    float64: per-chunk products on the host in float64 (devices compute in float32 unless
    jax_enable_x64 is on, which is the user's switch, not ours).
    """
    gram = np.zeros((k, k), dtype)
    for start in range(rows.start, rows.stop, chunk_rows):
        block = read(start, min(start + chunk_rows, rows.stop))
        if np.dtype(dtype) == np.float64:
            block = block.astype(np.float64)
            gram += block.T @ block
        else:
            gram += gram_rows(block, mesh)
    return gram


def stream_solve(read: Callable[[int, int], np.ndarray], write: Callable[[int, np.ndarray], None],
                 rows: range, inverse: np.ndarray, chunk_rows: int, mesh: Mesh) -> None:
    """``write(start, Φ·A)`` for the rows ``rows``, chunk by chunk, with ``inverse (k, k)``."""
    inverse = np.asarray(inverse, np.float32)
    for start in range(rows.start, rows.stop, chunk_rows):
        block = read(start, min(start + chunk_rows, rows.stop))
        write(start, solve_rows(block, inverse, mesh))


def stream_scores(read_features: Callable[[int, int], np.ndarray],
                  read_weights: Callable[[int, int], np.ndarray], targets: np.ndarray, n: int,
                  chunk_rows: int, mesh: Mesh, *, top_k: int | None = None,
                  target_chunk: int = 4096):
    """Scores of all n training rows against ``targets (M, m, k)``, streamed by row chunk.

    Args:
      read_features: ``(start, stop) -> (M, c, k) f32`` Φ_a·A_a rows of every checkpoint.
      read_weights: ``(start, stop) -> (c,) f32`` per-row weights (mean Q / M).
      targets: ``(M, m, k) f32``.
      n: training rows. chunk_rows: rows read at once. mesh: as for :func:`score_rows`.
      top_k: None for the dense ``(n, m) f32`` matrix; else a :class:`TopK` of width
        ``top_k``, with memory bounded by ``chunk_rows × target_chunk``, not by n.
      target_chunk: targets scored at once in top-k mode.
    """
    m = targets.shape[1]
    if top_k is None:
        scores = np.zeros((n, m), np.float32)
        for start in range(0, n, chunk_rows):
            stop = min(start + chunk_rows, n)
            scores[start:stop] = score_rows(read_features(start, stop),
                                            targets, read_weights(start, stop), mesh)
        return scores
    states = [None] * len(range(0, m, target_chunk))
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        features, weights = read_features(start, stop), read_weights(start, stop)
        for j, t0 in enumerate(range(0, m, target_chunk)):
            block = topk_rows(features, targets[:, t0:t0 + target_chunk], weights, start, n,
                              mesh, top_k)
            states[j] = block if states[j] is None else merge_topk(states[j], block, top_k)
        # Without this the loop only enqueues work (async dispatch) and every chunk read
        # stays alive until its turn: memory would grow with n_train, not the chunk.
        jax.block_until_ready(states)
    hi, hi_rows, lo, lo_rows = (np.concatenate([np.asarray(s[i]) for s in states])
                                for i in range(4))
    return TopK(hi_rows.astype(np.int64), hi.astype(np.float32),
                lo_rows.astype(np.int64), (-lo).astype(np.float32))
