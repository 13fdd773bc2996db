"""Store chunks streamed through the engine's kernels: the pieces of the finalize steps
that see rows, not files.

    chunk_rows           rows per chunk: 8 MiB of float32 features per checkpoint
    stream_gram          G = Σ_chunks Φ[c]ᵀΦ[c] over a range of rows, on the mesh
    stream_gram_sharded  the same, accumulated as row blocks over every device (large k)
    stream_fold          T = A φᵀ with A read by blocks of rows
    stream_scores        τ[c] = Σ_m Φ_m[c] T_m · mean_m Q_m[c] / M per chunk, or a top-k
    merge_process_topk   the best k of every process's top-k

Each reads through a callable ``read(start, stop) -> rows``, so the store's checks (row
checks, streaming hashes) stay in :mod:`trax_attr.pipeline`. Every chunk has the same
padded shape, so each kernel compiles once; a chunk is never longer than the rows there
are (1,000 rows are not padded to 4,096).

On a mesh of this host's one CPU device (:func:`on_host`) the products of XᵀX, the fold
and the dense scores are numpy's: the same float32 BLAS product XLA runs on a CPU, from
host memory, without compiling a program for each (in a fresh process those compiles
were most of finalize_scores: 0.1-0.6 s against 0.03 s of products at 1k rows).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh

from . import parallel
from .engine import TopK, fold_targets, merge_topk
from .engine.scores import select_top
from .parallel import solve as sharded

__all__ = ["chunk_rows", "on_host", "host_row_weights", "stream_gram", "stream_gram_sharded",
           "stream_fold", "stream_scores", "score_shapes", "merge_process_topk"]

_CHUNK_BYTES = 8 << 20     # default chunk: 8 MiB of float32 features
_MIN_CHUNK = 256


def chunk_rows(k: int, checkpoints: int = 1, override: int | None = None) -> int:
    """Rows per streamed chunk of ``checkpoints`` float32 arrays of width k: ``override``,
    or as many as fit in 8 MiB (4096 at k = 512, 1024 at k = 2048), at least 256."""
    if override is not None:
        return int(override)
    return max(_MIN_CHUNK, _CHUNK_BYTES // (4 * int(k) * int(checkpoints)))


def on_host(mesh: Mesh | None) -> bool:
    """Whether the kernels of ``mesh`` run on this host's one CPU device (None: the default
    device), where numpy's float32 products are XLA's without a compile."""
    devices = [jax.devices()[0]] if mesh is None else list(mesh.devices.flat)
    return len(devices) == 1 and devices[0].platform == "cpu"


def host_row_weights(out_to_loss: np.ndarray) -> np.ndarray:
    """:func:`~trax_attr.engine.row_weights` on the host: ``(c,) f32`` mean_m(Q_m) / M of
    ``out_to_loss (M, c)`` (a sum of M numbers per row: not worth a compiled program)."""
    q = np.asarray(out_to_loss, np.float32)
    return q.sum(axis=0, dtype=np.float32) / np.float32(q.shape[0] ** 2)


def _rows_chunk(chunk: int, rows: range) -> int:
    """``chunk``, or fewer when there are fewer rows (at least 1)."""
    return max(1, min(int(chunk), len(rows)))


# --- the streamed kernels -----------------------------------------------------------------
def stream_gram(read: Callable[[int, int], np.ndarray], rows: range, k: int, chunk: int,
                mesh: Mesh, dtype=np.float32) -> np.ndarray:
    """XᵀX ``(k, k)`` in ``dtype`` of the rows ``rows`` given by ``read(start, stop) (c, k)``.

    float32: :func:`trax_attr.parallel.gram` per chunk (each padded with zero rows to one
    shape), summed over chunks in float32 in chunk order. float64: the same chunks
    multiplied and summed on the host in float64 (devices compute in float32 unless
    jax_enable_x64 is on, which is the user's switch, not ours). float32 :func:`on_host`:
    each chunk's product in numpy, unpadded.
    """
    gram = np.zeros((k, k), dtype)
    chunk = _rows_chunk(chunk, rows)
    host = np.dtype(dtype) == np.float64 or on_host(mesh)
    shape = None if host else parallel.round_up(chunk, mesh.size)
    for start in range(rows.start, rows.stop, chunk):
        block = read(start, min(start + chunk, rows.stop))
        if host:
            block = np.asarray(block, dtype)
            gram += block.T @ block
        else:
            gram += np.asarray(parallel.gram(parallel.pad_rows(block, shape), mesh))
    return gram


def stream_gram_sharded(read: Callable[[int, int], np.ndarray], rows: range, steps: int,
                        chunk: int, mesh: Mesh, lay: sharded.Layout, dtype=np.float32
                        ) -> jax.Array:
    """XᵀX ``(K, K)`` rows-sharded over ``mesh`` (a :func:`~trax_attr.parallel.solve.
    solve_mesh`), of every process's ``rows`` given by ``read(start, stop) (c, k)``.

    Every process calls this with its own rows and the same ``steps`` (chunks of ``chunk``
    rows; a process out of rows brings zero rows), since each step is a collective.
    """
    local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    shape = parallel.round_up(chunk, local)
    acc = sharded.zeros(mesh, lay, np.dtype(dtype))
    for step in range(steps):
        start = rows.start + step * chunk
        stop = min(start + chunk, rows.stop)
        block = read(start, stop) if start < stop else np.zeros((0, lay.k), np.float32)
        block = parallel.pad_rows(np.asarray(block, dtype), shape)
        acc = sharded.accumulate(acc, sharded.rows_array(block, mesh), mesh, lay)
    return acc


def stream_fold(read_inverse: Callable[[int, int], np.ndarray], targets: np.ndarray,
                rows: range, block: int) -> np.ndarray:
    """T[rows] = A[rows] φᵀ ``(len(rows), m) f32`` with A read ``block`` rows at a time by
    ``read_inverse(start, stop) (r, k)``, ``targets (m, k) f32``: A is never whole in
    memory (:func:`~trax_attr.engine.fold_targets` per block; in numpy when the default
    device is this host's CPU, :func:`on_host`)."""
    out = np.zeros((len(rows), targets.shape[0]), np.float32)
    host = on_host(None)
    targets = np.asarray(targets, np.float32)
    targets = targets.T if host else jax.device_put(targets)
    block = _rows_chunk(block, rows)
    for start in range(rows.start, rows.stop, block):
        stop = min(start + block, rows.stop)
        a = read_inverse(start, stop)
        if host:
            out[start - rows.start:stop - rows.start] = np.asarray(a, np.float32) @ targets
        else:
            out[start - rows.start:stop - rows.start] = np.asarray(
                _fold_block(parallel.pad_rows(a, block), targets))[: stop - start]
    return out


_fold_block = jax.jit(fold_targets)


def _pad(x: np.ndarray, axis: int, size: int) -> np.ndarray:
    """``x`` padded with zeros along ``axis`` to ``size`` entries."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return np.pad(x, pad) if pad[axis][1] else x


def score_shapes(chunk: int, m: int, mesh: Mesh) -> tuple[int, int]:
    names = mesh.axis_names
    rows = mesh.shape[names[0]]
    cols = mesh.shape[names[1]] if len(names) > 1 else 1
    return parallel.round_up(chunk, rows), parallel.round_up(m, cols)


def stream_scores(read_train: Callable[[int, int], np.ndarray],
                  read_weights: Callable[[int, int], np.ndarray], folded: np.ndarray, n: int,
                  chunk: int, mesh: Mesh, *, top_k: int | None = None,
                  target_chunk: int = 4096, rows: range | None = None):
    """Scores of the training rows ``rows`` (all n by default) against ``folded (M, k, m)``
    targets, by row chunk.

    Args:
      read_train: ``(start, stop) -> (M, c, k) f32`` Φ_m rows of every checkpoint.
      read_weights: ``(start, stop) -> (c,) f32`` :func:`~trax_attr.engine.row_weights`.
      folded: ``(M, k, m) f32`` T_m = A_m φ_mᵀ.
      n: training rows. chunk: rows read at once. mesh: rows over its first axis, targets
        over its second (if any).
      top_k: None for the dense ``(len(rows), m) f32`` matrix; else a :class:`TopK` of
        width min(top_k, len(rows)), row numbers in ``range(n)``, with memory bounded by
        ``chunk × target_chunk``, not by n.
      target_chunk: targets scored at once in top-k mode.
      rows: the rows to score, e.g. this process's :func:`~trax_attr.parallel.process_rows`.
    """
    rows = range(n) if rows is None else rows
    m = folded.shape[2]
    chunk = _rows_chunk(chunk, rows)
    if top_k is None and on_host(mesh):
        folded = np.asarray(folded, np.float32)
        scores = np.zeros((len(rows), m), np.float32)
        for start in range(rows.start, rows.stop, chunk):
            stop = min(start + chunk, rows.stop)
            # Σ_m Φ_m T_m: one product over (checkpoint, column), as score_block's einsum
            block = np.tensordot(np.asarray(read_train(start, stop), np.float32), folded,
                                 axes=([0, 2], [0, 1]))
            scores[start - rows.start:stop - rows.start] = \
                block * np.asarray(read_weights(start, stop), np.float32)[:, None]
        return scores
    if top_k is None:
        shape, cols = score_shapes(chunk, m, mesh)
        targets = parallel.pad_axis(np.asarray(folded, np.float32), 2, cols)
        scores = np.zeros((len(rows), m), np.float32)
        for start in range(rows.start, rows.stop, chunk):
            stop = min(start + chunk, rows.stop)
            block = parallel.scores(_pad(read_train(start, stop), 1, shape),
                                    targets, parallel.pad_rows(read_weights(start, stop), shape),
                                    mesh)
            scores[start - rows.start:stop - rows.start] = np.asarray(block)[: stop - start, :m]
        return scores
    blocks = list(range(0, m, target_chunk))
    states = [None] * len(blocks)
    shape, cols = score_shapes(chunk, min(m, target_chunk), mesh)
    parts = [parallel.pad_axis(np.asarray(folded[:, :, t0:t0 + target_chunk], np.float32),
                               2, cols) for t0 in blocks]
    for start in range(rows.start, rows.stop, chunk):
        stop = min(start + chunk, rows.stop)
        train = _pad(read_train(start, stop), 1, shape)
        weights = parallel.pad_rows(read_weights(start, stop), shape)
        for j, (t0, part) in enumerate(zip(blocks, parts)):
            block = parallel.topk(train, part, weights, np.int32(start), np.int32(rows.stop),
                                  mesh, int(top_k))
            width = min(target_chunk, m - t0)
            block = tuple(a[:width] for a in block)
            states[j] = block if states[j] is None else merge_topk(states[j], block, int(top_k))
        # Without this the loop only enqueues work (async dispatch) and every chunk read
        # stays alive until its turn: memory would grow with n_train, not the chunk.
        jax.block_until_ready(states)
    if not len(rows):
        empty = np.zeros((m, 0), np.float32)
        return TopK(empty.astype(np.int64), empty, empty.astype(np.int64), empty)
    hi, hi_rows, lo, lo_rows = (np.concatenate([np.asarray(s[i]) for s in states])
                                for i in range(4))
    return TopK(hi_rows.astype(np.int64), hi.astype(np.float32),
                lo_rows.astype(np.int64), (-lo).astype(np.float32))


def merge_process_topk(top: TopK, k: int) -> TopK:
    """The best ``k`` of every process's :class:`TopK` (each over its own rows), on every
    process; ``top`` itself with one process."""
    if jax.process_count() == 1:
        return top
    m, width = top.proponents.shape

    def padded(values, fill):
        out = np.full((m, k), fill, values.dtype)
        out[:, :width] = values
        return out

    state = [padded(top.proponent_scores, -np.inf), padded(top.proponents, -1),
             padded(-top.opponent_scores, -np.inf), padded(top.opponents, -1)]
    gathered = [parallel.process_allgather(a) for a in state]           # (P, m, k) each
    merged = [np.concatenate(list(g), axis=1) for g in gathered]        # (m, P k)
    hi, hi_rows = (np.asarray(a) for a in select_top(merged[0], merged[1], k))
    lo, lo_rows = (np.asarray(a) for a in select_top(merged[2], merged[3], k))
    return TopK(hi_rows.astype(np.int64), hi.astype(np.float32),
                lo_rows.astype(np.int64), (-lo).astype(np.float32))
