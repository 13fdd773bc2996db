"""Finalize steps: store chunks streamed through the engine's kernels.

    finalize_features  for each checkpoint: G = Σ_chunks Φ[c]ᵀΦ[c] over this process's
                       rows, summed over processes; λ; A = (G + λI)⁻¹ (float64, host).
                       Writes xtx.npy and inverse.npy; Φ itself is never rewritten, so
                       another λ later costs one factorisation, not a pass over Φ.
    finalize_scores    T_m = A_m φ_mᵀ once per checkpoint, then for each chunk of rows
                       τ[c] = Σ_m Φ_m[c] T_m · mean_m Q_m[c] / M (or a streamed top-k).

Memory is bounded by the chunk (``chunk_rows`` rows of every checkpoint), not by n. Every
chunk has the same padded shape, so each kernel compiles once. The rows of Φ and Q are
hashed as they are read: finalize_features records their checksums, finalize_scores
checks them, and neither reads an array twice.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh

from . import parallel
from .engine import TopK, inverse_gram, merge_topk, resolve_lambda, row_weights
from .store import Store, StoreCorruptedError
from .store.checksums import RowStream, verify_row_checks
from .store.reading import present, read_rows
from .store.locks import job_lock

__all__ = ["chunk_rows", "stream_gram", "stream_scores", "finalize_features",
           "finalize_scores", "lambda_record", "missing_rows"]

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 8 << 20     # default chunk: 8 MiB of float32 features
_MIN_CHUNK = 256
_DONE_CHUNK = 1 << 20      # rows of a done bitmap (1 byte each) read at once


def chunk_rows(k: int, checkpoints: int = 1, override: int | None = None) -> int:
    """Rows per streamed chunk of ``checkpoints`` float32 arrays of width k: ``override``,
    or as many as fit in 8 MiB (4096 at k = 512, 1024 at k = 2048), at least 256."""
    if override is not None:
        return int(override)
    return max(_MIN_CHUNK, _CHUNK_BYTES // (4 * int(k) * int(checkpoints)))


# --- the streamed kernels -----------------------------------------------------------------
def stream_gram(read: Callable[[int, int], np.ndarray], rows: range, k: int, chunk: int,
                mesh: Mesh, dtype=np.float32) -> np.ndarray:
    """XᵀX ``(k, k)`` in ``dtype`` of the rows ``rows`` given by ``read(start, stop) (c, k)``.

    float32: :func:`trax_attr.parallel.gram` per chunk (each padded with zero rows to one
    shape), summed over chunks in float32 in chunk order. float64: the same chunks
    multiplied and summed on the host in float64 (devices compute in float32 unless
    jax_enable_x64 is on, which is the user's switch, not ours).
    """
    gram = np.zeros((k, k), dtype)
    shape = None if np.dtype(dtype) == np.float64 else parallel.round_up(chunk, mesh.size)
    for start in range(rows.start, rows.stop, chunk):
        block = read(start, min(start + chunk, rows.stop))
        if np.dtype(dtype) == np.float64:
            block = block.astype(np.float64)
            gram += block.T @ block
        else:
            gram += np.asarray(parallel.gram(parallel.pad_rows(block, shape), mesh))
    return gram


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
                  target_chunk: int = 4096):
    """Scores of all n training rows against ``folded (M, k, m)`` targets, by row chunk.

    Args:
      read_train: ``(start, stop) -> (M, c, k) f32`` Φ_m rows of every checkpoint.
      read_weights: ``(start, stop) -> (c,) f32`` :func:`~trax_attr.engine.row_weights`.
      folded: ``(M, k, m) f32`` T_m = A_m φ_mᵀ.
      n: training rows. chunk: rows read at once. mesh: rows over its first axis, targets
        over its second (if any).
      top_k: None for the dense ``(n, m) f32`` matrix; else a :class:`TopK` of width
        ``top_k``, with memory bounded by ``chunk × target_chunk``, not by n.
      target_chunk: targets scored at once in top-k mode.
    """
    m = folded.shape[2]
    if top_k is None:
        rows, cols = score_shapes(chunk, m, mesh)
        targets = parallel.pad_axis(np.asarray(folded, np.float32), 2, cols)
        scores = np.zeros((n, m), np.float32)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            block = parallel.scores(_pad(read_train(start, stop), 1, rows),
                                    targets, parallel.pad_rows(read_weights(start, stop), rows),
                                    mesh)
            scores[start:stop] = np.asarray(block)[: stop - start, :m]
        return scores
    blocks = list(range(0, m, target_chunk))
    states = [None] * len(blocks)
    rows, cols = score_shapes(chunk, min(m, target_chunk), mesh)
    parts = [parallel.pad_axis(np.asarray(folded[:, :, t0:t0 + target_chunk], np.float32),
                               2, cols) for t0 in blocks]
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        train = _pad(read_train(start, stop), 1, rows)
        weights = parallel.pad_rows(read_weights(start, stop), rows)
        for j, (t0, part) in enumerate(zip(blocks, parts)):
            block = parallel.topk(train, part, weights, np.int32(start), np.int32(n), mesh,
                                  int(top_k))
            width = min(target_chunk, m - t0)
            block = tuple(a[:width] for a in block)
            states[j] = block if states[j] is None else merge_topk(states[j], block, int(top_k))
        # Without this the loop only enqueues work (async dispatch) and every chunk read
        # stays alive until its turn: memory would grow with n_train, not the chunk.
        jax.block_until_ready(states)
    hi, hi_rows, lo, lo_rows = (np.concatenate([np.asarray(s[i]) for s in states])
                                for i in range(4))
    return TopK(hi_rows.astype(np.int64), hi.astype(np.float32),
                lo_rows.astype(np.int64), (-lo).astype(np.float32))


# --- finalize_features --------------------------------------------------------------------
def lambda_record(lambda_reg, value: float, rescale: bool) -> dict:
    """What a finalized checkpoint records of its λ: the request ("auto" or a number),
    the value it resolved to, and traker's rescaling."""
    return {"lambda_reg": lambda_reg, "value": float(value), "traker_inverse_rescale": rescale}


def _wanted(meta: dict, lambda_reg, rescale: bool) -> bool:
    """Whether a finalized checkpoint already holds the inverse asked for."""
    held = meta.get("lambda") or {}
    return (held.get("lambda_reg") == lambda_reg
            and held.get("traker_inverse_rescale") == bool(rescale))


def missing_rows(store: Store, model_id: int, n: int) -> tuple[list[int], int]:
    """(first few missing training rows, how many) of a checkpoint, read in chunks."""
    done = store.array_path(model_id, "done")
    if not present(done):
        return list(range(min(n, 8))), n
    first, count = [], 0
    for start in range(0, n, _DONE_CHUNK):
        flags = read_rows(done, start, start + _DONE_CHUNK)
        if (flags > 2).any():
            raise StoreCorruptedError(
                f"{str(done)!r} holds done flags other than 0, 1 and 2 (e.g. row "
                f"{int(np.argmax(flags > 2)) + start}); it is corrupted. Delete the folder "
                f"{str(done.parent)!r} and featurize model_id={model_id} again.")
        left = np.flatnonzero(flags == 0)
        count += left.size
        first.extend((left[: 8 - len(first)] + start).tolist())
    return first, count


class _CheckedRows:
    """The Φ rows of a checkpoint read by chunk, each chunk checked against the row checks
    written with Φ and Q (:func:`~trax_attr.store.row_checks`). One process streams and
    hashes the files as it reads them; with several, each reads its own rows and process
    0 hashes the files in a second pass."""

    def __init__(self, store: Store, model_id: int, n: int, k: int, streamed: bool):
        shapes = {"grads": ((n, k), np.float32), "out_to_loss": ((n,), np.float32),
                  "check": ((n,), np.uint64)}
        self.paths = {name: store.array_path(model_id, name) for name in shapes}
        self.what = f"the training rows of model_id={model_id}"
        self.salt = store.row_salt(model_id)
        self.fix = (f"Delete the folder {str(store.model_dir(model_id))!r} and featurize "
                    f"model_id={model_id} again.")
        self.streams = {}
        try:
            for name, shape in shapes.items():
                if streamed:
                    self.streams[name] = RowStream(self.paths[name], *shape)
        except BaseException:
            self.close()
            raise

    def read(self, start: int, stop: int) -> np.ndarray:
        if self.streams:
            parts = {name: s.read(start, stop) for name, s in self.streams.items()}
        else:
            parts = {name: read_rows(path, start, stop) for name, path in self.paths.items()}
        verify_row_checks(start, parts["check"], [parts["grads"], parts["out_to_loss"]],
                          self.what, self.fix, self.salt)
        return parts["grads"]

    def records(self) -> dict[str, dict]:
        """The file records of grads.npy and out_to_loss.npy."""
        streams = self.streams or {name: RowStream(self.paths[name])
                                   for name in ("grads", "out_to_loss")}
        return {f"{name}.npy": streams[name].record() for name in ("grads", "out_to_loss")}

    def close(self) -> None:
        for stream in self.streams.values():
            stream.close()


def finalize_features(store: Store, model_ids, *, n: int, k: int, lambda_reg, rescale: bool,
                      xtx_dtype, chunk: int, mesh: Mesh) -> None:
    """Finalize ``model_ids`` (see the module docstring); already finalized checkpoints
    with the same λ request are kept as they are. With several processes every one calls
    this: each streams its :func:`~trax_attr.parallel.process_rows`, process 0 writes."""
    parallel.barrier()  # every process has written its rows
    for model_id in model_ids:
        meta = store.model_meta(model_id)
        if meta is None:
            raise ValueError(f"model_id={model_id} was never featurized; featurized ids are "
                             f"{store.model_ids()}.")
        if meta["finalized"] and _wanted(meta, lambda_reg, rescale) \
                and jax.process_count() == 1:
            continue  # no lock needed: a finalized read-only store can be scored

        def decide(model_id=model_id):  # under the lock: another process may have done it
            meta = store.model_meta(model_id)
            return not (meta["finalized"] and _wanted(meta, lambda_reg, rescale))

        with job_lock(lambda: store.model_lock(model_id, shared=False,
                                               doing="finalize_features of"),
                      decide, first=jax.process_index() == 0,
                      broadcast=parallel.broadcast_int,
                      busy=f"cannot finalize_features of model_id={model_id} in "
                           f"{str(store.root)!r}: process 0 of this job found another "
                           f"process featurizing or finalizing it (locks/model-{model_id}"
                           ".lock). Wait until that process is done, then call again.",
                      failed=f"process 0 of this job could not start finalize_features of "
                             f"model_id={model_id}; its own error says why and what to do."
                      ) as go:
            if go:
                _finalize_one(store, model_id, n=n, k=k, lambda_reg=lambda_reg,
                              rescale=rescale, xtx_dtype=xtx_dtype, chunk=chunk, mesh=mesh)
                logger.info("finalized features of model_id=%d (n=%d, k=%d)", model_id, n, k)
            parallel.barrier()  # process 0 keeps the lock until every process is done


def _finalize_one(store: Store, model_id: int, *, n, k, lambda_reg, rescale, xtx_dtype,
                  chunk, mesh) -> None:
    first = jax.process_index() == 0
    meta = store.model_meta(model_id)
    if meta["finalized"]:  # another λ: XᵀX is on disk, Φ is not read again
        gram, records = store.finished(model_id, "xtx", (k, k), np.dtype(xtx_dtype)), {}
    else:
        # every process reads the whole done bitmap, so all raise the same error on
        # missing rows (none waits at a barrier for a process that has given up)
        if present(store.array_path(model_id, "done")):  # shapes, dtypes, complete set
            store.model_arrays(model_id, n, k, mode="r")
        missing, count = missing_rows(store, model_id, n)
        if count:
            raise ValueError(
                f"model_id={model_id} is missing {count} of {n} training rows (e.g. "
                f"{missing}); featurize them before finalize_features.")
        rows = _CheckedRows(store, model_id, n, k, streamed=jax.process_count() == 1)
        try:
            gram = parallel.process_sum(stream_gram(rows.read, parallel.process_rows(n), k,
                                                    chunk, mesh, xtx_dtype))
            records = rows.records() if first else {}
        finally:
            rows.close()
    if not first:
        return
    value = resolve_lambda(lambda_reg, gram, n)
    inverse = inverse_gram(gram, value, traker_inverse_rescale=rescale)
    arrays = {"inverse": inverse.astype(np.float32)}
    if not meta["finalized"]:
        arrays["xtx"] = gram
    store.finish_model(model_id, arrays, records,
                       {"finalized": True, "lambda": lambda_record(lambda_reg, value, rescale)})


# --- finalize_scores ----------------------------------------------------------------------
def finalize_scores(store: Store, exp_name: str, model_ids, *, allow_skip: bool, n: int,
                    k: int, chunk: int, mesh: Mesh, top_k: int | None, target_chunk: int):
    """Average the checkpoints' scores of ``exp_name`` and weight them by mean Q; see
    :meth:`trax_attr.TRAKer.finalize_scores`. Call under the exclusive experiment lock."""
    exp = store.experiment_meta(exp_name)
    if exp is None:
        raise ValueError(
            f"experiment {exp_name!r} does not exist in {str(store.root)!r} (existing: "
            f"{store.experiment_names()}); call start_scoring_checkpoint first.")
    store.check_listed(exp_name, exp)
    ids = exp["model_ids"] if model_ids is None else model_ids
    m = exp["num_targets"]
    used = []
    for model_id in ids:
        if model_id not in exp["model_ids"]:
            raise ValueError(f"model_id={model_id} was not scored in experiment {exp_name!r} "
                             f"(scored: {exp['model_ids']}).")
        done = store.target_arrays(exp_name, model_id, m, k)["done"]
        missing = np.flatnonzero(done == 0)
        if missing.size:
            message = (f"experiment {exp_name!r}, model_id={model_id} is missing {missing.size} "
                       f"of {m} targets (e.g. {missing[:8].tolist()}); score them first")
            if not allow_skip:
                raise ValueError(message + ", or pass allow_skip=True to leave it out.")
            warnings.warn(message + "; leaving this checkpoint out.", stacklevel=3)
            continue
        used.append(model_id)
    if not used:
        raise ValueError(f"experiment {exp_name!r} has no checkpoint with all targets scored.")
    lambdas = {}
    for model_id in used:
        meta = store.model_meta(model_id)
        if meta is None or not meta["finalized"]:
            raise ValueError(f"model_id={model_id} of experiment {exp_name!r} is not finalized "
                             f"in {str(store.root)!r}; call finalize_features() first.")
        lambdas[model_id] = meta["lambda"]
    requests = {(lam["lambda_reg"], lam["traker_inverse_rescale"]) for lam in lambdas.values()}
    if len(requests) > 1:
        shown = ", ".join(f"model_id={i}: lambda_reg={lam['lambda_reg']!r}"
                          for i, lam in lambdas.items())
        raise ValueError(
            f"the checkpoints of experiment {exp_name!r} were finalized with different λ "
            f"({shown}); one experiment's scores use one λ. Call "
            "finalize_features(lambda_reg=...) once for all of them, then finalize_scores.")
    targets = {i: store.finished_targets(exp_name, i, m, k) for i in used}
    store.finish_targets(exp_name, {i: record for i, (_, record) in targets.items()})
    targets = np.stack([values for values, _ in targets.values()])
    inverses = np.stack([np.asarray(store.finished(i, "inverse", (k, k), np.float32))
                         for i in used])
    folded = np.asarray(parallel.fold(inverses, targets))
    with contextlib.ExitStack() as streams:
        train, q = [], []
        for i in used:  # each closed on the way out, even if a later one fails to open
            train.append(streams.enter_context(contextlib.closing(
                RowStream(store.array_path(i, "grads"), (n, k), np.float32))))
            q.append(streams.enter_context(contextlib.closing(
                RowStream(store.array_path(i, "out_to_loss"), (n,), np.float32))))

        def read_train(start, stop):
            return np.stack([s.read(start, stop) for s in train])

        def read_weights(start, stop):
            return np.asarray(row_weights(np.stack([s.read(start, stop) for s in q])))

        result = stream_scores(read_train, read_weights, folded, n, chunk, mesh,
                               top_k=top_k, target_chunk=target_chunk)
        for model_id, stream, name in [(i, s, "grads") for i, s in zip(used, train)] + \
                                      [(i, s, "out_to_loss") for i, s in zip(used, q)]:
            stream.verify(store.record(model_id, name), f"{name}.npy of model_id={model_id}",
                          f"Delete the folder {str(store.model_dir(model_id))!r} and "
                          f"featurize model_id={model_id} again.")
    if top_k is None:
        store.save_scores(exp_name, result, {
            "model_ids": list(used),
            "lambda": {str(i): lambdas[i] for i in used}})
    return result

