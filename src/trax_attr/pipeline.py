"""Finalize steps: store chunks streamed through the engine's kernels.

    finalize_features  for each checkpoint: G = Σ_chunks Φ[c]ᵀΦ[c] over this process's
                       rows, summed over processes; λ; A = (G + λI)⁻¹ (float64, host).
                       For large k (``solve``, :func:`~trax_attr.engine.choose_solve`)
                       G and A are sharded by rows over every device of every process
                       instead (:mod:`trax_attr.parallel.solve`, float32).
                       Writes xtx.npy and inverse.npy; Φ itself is never rewritten, so
                       another λ later costs one factorisation, not a pass over Φ.
    finalize_scores    T_m = A_m φ_mᵀ once per checkpoint (A read by blocks of rows, each
                       process its share), then for each chunk of this process's rows
                       τ[c] = Σ_m Φ_m[c] T_m · mean_m Q_m[c] / M (or a streamed top-k);
                       the processes' rows are gathered (top-k: merged).

The streamed kernels themselves are in :mod:`trax_attr.streams` (re-exported here).
Memory is bounded by the chunk (``chunk_rows`` rows of every checkpoint), not by n; k x k
is held whole on the host only by the host solve (and by process 0 while it writes the
finished xtx.npy and inverse.npy). Every chunk has the same padded shape, so each kernel
compiles once. The rows of Φ and Q are
hashed as they are read: finalize_features records their checksums, finalize_scores
checks them, and neither reads an array twice.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import jax
import numpy as np
from jax.sharding import Mesh

from . import parallel
from .engine import inverse_gram, resolve_lambda
from .engine.linalg import choose_solve
from .parallel import solve as sharded
from .store.backend import StoreBackend
from .store.checksums import verify_row_checks
from .store.locks import job_lock
from .streams import (chunk_rows, host_row_weights, merge_process_topk, stream_fold,
                      stream_gram, stream_gram_sharded, stream_scores)

__all__ = ["chunk_rows", "stream_gram", "stream_gram_sharded", "stream_fold", "stream_scores",
           "merge_process_topk", "finalize_features", "finalize_scores", "scores_lock",
           "lambda_record", "missing_rows"]

logger = logging.getLogger(__name__)


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


def missing_rows(store: StoreBackend, model_id: int, n: int) -> tuple[list[int], int]:
    """(first few missing training rows, how many) of a checkpoint, read in chunks."""
    return store.missing_rows(model_id, n)


class _CheckedRows:
    """The Φ rows of a checkpoint read by chunk, each chunk checked against the row checks
    written with Φ and Q (:func:`~trax_attr.store.row_checks`). One process streams and
    hashes the files as it reads them; with several, each reads its own rows and process
    0 hashes the files in a second pass."""

    def __init__(self, store: StoreBackend, model_id: int, n: int, k: int, streamed: bool):
        shapes = {"grads": ((n, k), np.float32), "out_to_loss": ((n,), np.float32),
                  "check": ((n,), np.uint64)}
        self.store, self.model_id = store, model_id
        self.what = f"the training rows of model_id={model_id}"
        self.salt = store.row_salt(model_id)
        self.fix = (f"Delete the folder {str(store.model_dir(model_id))!r} and featurize "
                    f"model_id={model_id} again.")
        self.streams = {}
        try:
            for name, shape in shapes.items():
                if streamed:
                    self.streams[name] = store.row_stream(model_id, name, *shape)
        except BaseException:
            self.close()
            raise

    def read(self, start: int, stop: int) -> np.ndarray:
        if self.streams:
            parts = {name: s.read(start, stop) for name, s in self.streams.items()}
        else:
            parts = {name: self.store.read_rows(self.model_id, name, start, stop)
                     for name in ("grads", "out_to_loss", "check")}
        verify_row_checks(start, parts["check"], [parts["grads"], parts["out_to_loss"]],
                          self.what, self.fix, self.salt)
        return parts["grads"]

    def records(self) -> dict[str, dict]:
        """The file records of grads.npy and out_to_loss.npy."""
        streams = self.streams or {name: self.store.row_stream(self.model_id, name)
                                   for name in ("grads", "out_to_loss")}
        return {f"{name}.npy": streams[name].record() for name in ("grads", "out_to_loss")}

    def close(self) -> None:
        for stream in self.streams.values():
            stream.close()


def finalize_features(store: StoreBackend, model_ids, *, n: int, k: int, lambda_reg, rescale: bool,
                      xtx_dtype, chunk: int, mesh: Mesh, solve: str = "auto") -> None:
    """Finalize ``model_ids`` (see the module docstring); already finalized checkpoints
    with the same λ request are kept as they are. With several processes every one calls
    this: each streams its :func:`~trax_attr.parallel.process_rows`, process 0 writes.

    ``solve``: ``"host"`` (float64 on the host), ``"sharded"`` (float32 on the mesh of
    every process's devices), or ``"auto"``: :func:`~trax_attr.engine.choose_solve`.
    """
    solve = choose_solve(solve, k, xtx_dtype)
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
                              rescale=rescale, xtx_dtype=xtx_dtype, chunk=chunk, mesh=mesh,
                              solve=solve)
                logger.info("finalized features of model_id=%d (n=%d, k=%d, %s solve)",
                            model_id, n, k, solve)
            parallel.barrier()  # process 0 keeps the lock until every process is done


def _finalize_one(store: StoreBackend, model_id: int, *, n, k, lambda_reg, rescale, xtx_dtype,
                  chunk, mesh, solve) -> None:
    first = jax.process_index() == 0
    meta = store.model_meta(model_id)
    dtype = np.dtype(xtx_dtype)
    if solve == "sharded":
        smesh = sharded.solve_mesh(mesh)
        lay = sharded.layout(k, smesh.size)
    records, gram = {}, None
    if meta["finalized"]:  # another λ: XᵀX is on disk, Φ is not read again
        stored = store.finished(model_id, "xtx", (k, k), dtype)  # verified
        if solve == "sharded":  # each process reads its devices' rows only
            acc = sharded.from_rows(lambda a, b: store.read_rows(model_id, "xtx", a, b), lay,
                                    smesh, dtype)
        else:
            gram = stored
        del stored
    else:
        # every process reads the whole done bitmap, so all raise the same error on
        # missing rows (none waits at a barrier for a process that has given up)
        if store.has_rows(model_id):  # shapes, dtypes, complete set
            store.model_arrays(model_id, n, k, mode="r")
        missing, count = missing_rows(store, model_id, n)
        if count:
            raise ValueError(
                f"model_id={model_id} is missing {count} of {n} training rows (e.g. "
                f"{missing}); featurize them before finalize_features.")
        mine = parallel.process_rows(n)
        rows = _CheckedRows(store, model_id, n, k, streamed=jax.process_count() == 1)
        try:
            if solve == "sharded":
                most = max(len(parallel.process_rows(n, i))  # rows of the largest process
                           for i in range(jax.process_count()))
                acc = stream_gram_sharded(rows.read, mine, -(-most // chunk), chunk, smesh,
                                          lay, dtype)
                gram = sharded.fetch(acc, lay, smesh)  # process 0's host, for xtx.npy
            else:
                gram = parallel.process_sum(stream_gram(rows.read, mine, k, chunk, mesh,
                                                        xtx_dtype))
            records = rows.records() if first else {}
        finally:
            rows.close()
    if solve == "sharded":
        a, value = sharded.inverse(acc, n, lambda_reg, smesh, lay,
                                   traker_inverse_rescale=rescale)
        inverse = sharded.fetch(a, lay, smesh)
        del a, acc
        if not first:
            return
    else:
        if not first:
            return
        value = resolve_lambda(lambda_reg, gram, n)
        inverse = inverse_gram(gram, value, traker_inverse_rescale=rescale)
    arrays = {"inverse": inverse.astype(np.float32, copy=False)}
    if not meta["finalized"]:
        arrays["xtx"] = gram
    store.finish_model(model_id, arrays, records,
                       {"finalized": True, "lambda": lambda_record(lambda_reg, value, rescale)})


# --- finalize_scores ----------------------------------------------------------------------
def scores_lock(store: StoreBackend, exp_name: str):
    """The exclusive lock of experiment ``exp_name`` for finalize_scores: with several
    processes process 0 holds it for all of them (:func:`~trax_attr.store.locks.job_lock`),
    since every process scores its own rows."""
    def acquire():
        return store.experiment_lock(exp_name, shared=False, doing="finalize_scores of")

    if jax.process_count() == 1:
        return acquire()
    return job_lock(acquire, lambda: True, first=jax.process_index() == 0,
                    broadcast=parallel.broadcast_int,
                    busy=f"cannot finalize_scores of experiment {exp_name!r} in "
                         f"{str(store.root)!r}: process 0 of this job found another process "
                         "scoring or finalizing it. Wait until that process is done, then call "
                         "again.",
                    failed=f"process 0 of this job could not start finalize_scores of "
                           f"experiment {exp_name!r}; its own error says why and what to do.")


def finalize_scores(store: StoreBackend, exp_name: str, model_ids, *, allow_skip: bool, n: int,
                    k: int, chunk: int, mesh: Mesh, top_k: int | None, target_chunk: int):
    """Average the checkpoints' scores of ``exp_name`` and weight them by mean Q; see
    :meth:`trax_attr.TRAKer.finalize_scores`. Call under :func:`scores_lock`. With several
    processes every one calls it, scores its own rows and returns all of them; process 0
    writes scores.npy."""
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
    count = jax.process_count()
    # T_m = A_m φ_mᵀ, A_m read by blocks of rows; with several processes each folds its
    # share of the k rows and the shares are gathered ((M, k, m) is small next to A).
    fold_rows = parallel.process_rows(k, block=1)
    # targets checked against their record (or, the first time, their row checks)
    targets = {i: store.finished_targets(exp_name, i, m, k) for i in used}
    if jax.process_index() == 0:  # metadata is written by one process
        store.finish_targets(exp_name, {i: record for i, (_, record) in targets.items()})
    parts = []
    for model_id in used:
        store.finished(model_id, "inverse", (k, k), np.float32)  # verified, then read by rows
        parts.append(stream_fold(lambda a, b, i=model_id: store.read_rows(i, "inverse", a, b),
                                 targets[model_id][0], fold_rows, chunk_rows(k)))
    folded = parallel.process_concat(np.stack(parts, axis=1)).transpose(1, 0, 2)
    del parts
    if count == 1:
        result = _score_streams(store, used, folded, n, chunk, mesh, top_k, target_chunk)
    else:
        result = _score_process_rows(store, used, folded, n, chunk, mesh, top_k,
                                     target_chunk)
    if jax.process_index() != 0:
        return result
    if top_k is None:
        store.save_scores(exp_name, result, {
            "model_ids": list(used),
            "lambda": {str(i): lambdas[i] for i in used}})
    return result


def _score_streams(store, used, folded, n, chunk, mesh, top_k, target_chunk):
    """One process: every row, each file hashed as it is read and checked at the end."""
    k = folded.shape[1]
    with contextlib.ExitStack() as streams:
        train, q = [], []
        for i in used:  # each closed on the way out, even if a later one fails to open
            train.append(streams.enter_context(contextlib.closing(
                store.row_stream(i, "grads", (n, k), np.float32))))
            q.append(streams.enter_context(contextlib.closing(
                store.row_stream(i, "out_to_loss", (n,), np.float32))))

        def read_train(start, stop):
            return np.stack([s.read(start, stop) for s in train])

        def read_weights(start, stop):
            return host_row_weights(np.stack([s.read(start, stop) for s in q]))

        result = stream_scores(read_train, read_weights, folded, n, chunk, mesh,
                               top_k=top_k, target_chunk=target_chunk)
        for model_id, stream, name in [(i, s, "grads") for i, s in zip(used, train)] + \
                                      [(i, s, "out_to_loss") for i, s in zip(used, q)]:
            stream.verify(store.record(model_id, name), f"{name}.npy of model_id={model_id}",
                          f"Delete the folder {str(store.model_dir(model_id))!r} and "
                          f"featurize model_id={model_id} again.")
    return result


def _score_process_rows(store, used, folded, n, chunk, mesh, top_k, target_chunk):
    """Several processes: each scores its :func:`~trax_attr.parallel.process_rows`; the
    dense rows are gathered on every process, the top-k states merged. Process 0 checks
    every file against its record first (a hash cannot be split over readers) and every
    process raises its verdict, so none waits at a gather for one that gave up."""
    error = None
    if jax.process_index() == 0:
        try:
            for model_id in used:
                for name in ("grads", "out_to_loss"):
                    store.verify_rows(model_id, name, f"{name}.npy of model_id={model_id}",
                                      f"Delete the folder {str(store.model_dir(model_id))!r} "
                                      f"and featurize model_id={model_id} again.")
        except ValueError as err:
            error = err
    if parallel.broadcast_int(int(error is not None)):
        raise error or ValueError("process 0 of this job found a stored training array that "
                                  "does not match its record; its error says which.")
    def read_train(start, stop):
        return np.stack([store.read_rows(i, "grads", start, stop) for i in used])

    def read_weights(start, stop):
        return host_row_weights(np.stack([store.read_rows(i, "out_to_loss", start, stop)
                                          for i in used]))

    mine = stream_scores(read_train, read_weights, folded, n, chunk, mesh, top_k=top_k,
                         target_chunk=target_chunk, rows=parallel.process_rows(n))
    if top_k is None:
        return parallel.process_concat(mine)
    return merge_process_topk(mine, int(top_k))

