"""The rows of a batch: which examples they are, which are still to do, NaN policy.

Host-side (numpy) steps the TRAKer runs on every batch, with errors that name the
examples: the batch's row numbers (``inds`` or the cursor), the part of it not yet on
disk (padded to a power of two, so partial batches reuse few compiled shapes), and what
to do with non-finite inputs and results. What a task needs of its batch (labels in
range, the number of arrays) is the task's own ``check_batch``.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from .models.checkpoints import CheckpointMismatchError

__all__ = ["NonFiniteError", "NonFiniteWarning", "NONFINITE_MODES", "nonfinite_rows",
           "check_nonfinite_mode", "as_batch", "check_batch", "check_finite_weights",
           "batch_rows", "todo", "finish_rows"]

NONFINITE_MODES = ("raise", "zero")


class NonFiniteError(ValueError):
    """Inputs, model outputs or gradients of some examples are NaN or Inf."""


class NonFiniteWarning(UserWarning):
    """Rows with NaN or Inf were stored as zeros (``TRAKer(..., nonfinite="zero")``)."""


def check_nonfinite_mode(nonfinite: str) -> str:
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(
            f"nonfinite={nonfinite!r} is not an option; use 'raise' (stop at the first NaN or "
            "Inf, naming the examples) or 'zero' (store those examples as zero rows, which "
            "get score 0, and warn how many)."
        )
    return nonfinite


def nonfinite_rows(*arrays) -> np.ndarray:
    """``(B,) bool``: True where any floating entry of an example (leading axis) is NaN/Inf."""
    bad = np.zeros(len(arrays[0]), bool)
    for array in arrays:
        array = np.asarray(array)
        if not np.issubdtype(array.dtype, np.floating) and array.dtype.kind != "c":
            if array.dtype.name != "bfloat16":
                continue
            array = array.astype(np.float32)
        rows = ~np.isfinite(array.reshape(len(array), -1)).all(axis=1)
        bad |= rows
    return bad


def as_batch(batch) -> tuple[np.ndarray, ...]:
    """The user's batch as a tuple of host arrays with one leading batch axis B.

    Python lists and scalars become numpy arrays; JAX arrays are fetched to the host."""
    if not isinstance(batch, (tuple, list)) or not batch:
        raise TypeError(
            f"batch must be a tuple of arrays with a leading batch axis, e.g. (x, y); got "
            f"{type(batch).__name__}."
        )
    arrays = []
    for i, a in enumerate(batch):
        try:
            array = np.asarray(a)
        except (TypeError, ValueError) as err:
            raise TypeError(f"batch[{i}] is not an array ({type(a).__name__}: {err}); pass "
                            "numpy or JAX arrays.") from None
        if array.dtype == object:
            raise TypeError(f"batch[{i}] does not form a numeric array (ragged lists or "
                            "Python objects); pad sequences to one length and pass arrays.")
        arrays.append(array)
    sizes = {a.shape[0] if a.ndim else None for a in arrays}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"every array of batch needs the same leading batch axis; got shapes "
            f"{[list(a.shape) for a in arrays]}."
        )
    return tuple(arrays)


def _describe(batch) -> str:
    return ", ".join(f"batch[{i}] {a.dtype}{list(a.shape)}" for i, a in enumerate(batch))


def _kind(dtype: np.dtype) -> str:
    return {"f": "floating", "c": "complex", "i": "integer", "u": "integer",
            "b": "integer"}.get(dtype.kind, "floating" if dtype.name == "bfloat16" else dtype.kind)


def _against_first(batch: tuple, first: tuple) -> list[tuple[str, bool]]:
    """``(what differs, whether it is never legitimate)`` between ``batch`` and the first
    batch, array by array. Another length along an axis may be fine (a sequence length);
    another rank, or integers where the first batch held floats, never is."""
    lines = []
    for i, (a, (shape, dtype)) in enumerate(zip(batch, first)):
        if a.shape[1:] != shape:
            lines.append((f"batch[{i}] has per-example shape {list(a.shape[1:])} where the "
                          f"first batch had {list(shape)}", len(a.shape[1:]) != len(shape)))
        elif _kind(a.dtype) != _kind(dtype):
            lines.append((f"batch[{i}] holds {_kind(a.dtype)} values ({a.dtype}) where the "
                          f"first batch held {_kind(dtype)} ({dtype})", True))
    return lines


def check_batch(task, apply, params, state, batch: tuple, rows: np.ndarray,
                seen: dict, *, traced: bool = True) -> None:
    """The task's checks of ``batch`` (:meth:`ModelOutput.check_batch`), and the model
    evaluated abstractly on it, with errors that name the arrays of the batch.

    Args:
      task: the :class:`~trax_attr.ModelOutput`; apply: ``apply(params, state, *inputs)``.
      batch: host arrays (:func:`as_batch`); rows: ``(B,)`` their row numbers.
      seen: the caller's memo, kept across batches: output shapes by input shapes, and the
        per-example shapes and dtypes of the first batch that passed. A later batch whose
        arrays change rank or kind of values (integers where the first had floats...), or
        on which the model cannot run, is refused naming what differs from the first.
      traced: whether ``apply`` is the model's JAX function (False for models whose
        gradients come from the host, e.g. torch: the task's checks that need the output
        shape are then skipped).
    """
    first = seen.get("first batch")
    differs = [] if first is None or len(first) != len(batch) else _against_first(batch, first)
    if any(never for _, never in differs):
        raise ValueError("this batch does not match the first batch of this TRAKer: "
                         + "; ".join(line for line, never in differs if never)
                         + f" ({_describe(batch)}). Pass every batch with the same arrays, in "
                         "the same order, as the first.")
    failed = []

    def output_shape(*inputs):
        key = tuple((a.shape, a.dtype.str) for a in inputs)
        if key not in seen:
            try:
                seen[key] = jax.eval_shape(apply, params, state, *inputs).shape
            except Exception as err:  # the model's own error, named below with the batch
                failed.append(err)
                raise
        return seen[key]

    try:
        task.check_batch(batch, rows, output_shape)
    except Exception as err:
        if not failed or err is not failed[0]:
            raise
    if failed and traced:
        err = failed[0]
        if isinstance(err, CheckpointMismatchError):
            raise err  # the checkpoint's leaves are at fault, not the batch: named already
        message = (str(err).strip().splitlines() or [""])[0].rstrip(".")
        raise ValueError(
            f"the model cannot run on this batch ({_describe(batch)}): "
            f"{type(err).__name__}: {message[:1200]}"
            + (f". Against the first batch: {'; '.join(line for line, _ in differs)}"
               if differs else "")
            + ". Check the arrays' shapes and order against what the model takes (inputs "
            "first, labels last for classification)."
        ) from err
    if first is None:
        seen["first batch"] = tuple((a.shape[1:], a.dtype) for a in batch)


def _finite(leaf, nan_only: bool) -> np.ndarray:
    """Where ``leaf`` is finite (``nan_only``: not NaN), as a host array. Leaves already on
    the host are checked with numpy: a jnp check compiles one program per leaf shape
    (about 0.1 s each in a fresh process, for microseconds of work)."""
    on_host = not isinstance(leaf, jax.Array) or all(
        device.platform == "cpu" for device in leaf.devices())
    if on_host:
        values = np.asarray(leaf)
        if values.dtype.kind not in "fc":  # bfloat16 and other ml_dtypes: via float32
            values = values.astype(np.float32)
        return ~np.isnan(values) if nan_only else np.isfinite(values)
    return np.asarray(~jnp.isnan(leaf) if nan_only else jnp.isfinite(leaf))


def check_finite_weights(params, state, model_id: int) -> None:
    """Refuse a checkpoint whose parameters hold NaN or Inf, or whose state holds NaN,
    naming the leaf: every output (and gradient) would be non-finite, whatever the
    examples. State may hold ±Inf: attention masks do (open_clip's ``attn_mask``)."""
    for what, tree in (("parameter", params), ("state entry", state)):
        leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
        for path, leaf in leaves:
            dtype = getattr(leaf, "dtype", None)
            if dtype is None or not (jnp.issubdtype(dtype, jnp.floating)
                                     or jnp.issubdtype(dtype, jnp.complexfloating)):
                continue
            finite = _finite(leaf, nan_only=what != "parameter")
            bad = int(np.size(finite) - np.count_nonzero(finite))
            if bad:
                index = np.unravel_index(int(np.argmin(np.asarray(finite).reshape(-1))),
                                         np.shape(leaf))
                raise ValueError(
                    f"the checkpoint loaded as model_id={model_id} holds "
                    f"{'NaN or Inf' if what == 'parameter' else 'NaN'} in "
                    f"{what} {jax.tree_util.keystr(path) or '(the root)'} ({bad} of "
                    f"{np.size(finite)} values, e.g. at index {tuple(int(i) for i in index)}): "
                    "every output and gradient would be non-finite, whatever the examples. "
                    "Load a checkpoint saved before training diverged, or fix those weights.")


def batch_rows(batch: tuple, inds, num_samples, cursor: int, limit: int,
               what: str) -> np.ndarray:
    """``(B,) int64`` row numbers of the examples of ``batch``: ``inds``, or the next B
    rows after ``cursor``; checked to be distinct and in ``[0, limit)``."""
    size = batch[0].shape[0]
    if inds is None:
        count = size if num_samples is None else num_samples
        if count != size:
            raise ValueError(
                f"num_samples={num_samples} but the batch holds {size} examples; pass "
                "num_samples=len(batch[0]) or explicit inds."
            )
        inds = np.arange(cursor, cursor + size)
    else:
        if num_samples is not None and num_samples != size:
            raise ValueError(
                f"num_samples={num_samples} but the batch holds {size} examples; pass "
                "num_samples=len(batch[0]) or leave it out when giving inds."
            )
        inds = np.asarray(inds)
        if (not np.issubdtype(inds.dtype, np.integer) or inds.dtype == np.bool_
                or inds.shape != (size,)):
            raise ValueError(
                f"inds must be {size} integers, one per example of the batch; got "
                f"{inds.dtype}{list(inds.shape)}. Pass e.g. np.arange(start, start + {size})."
            )
    out = (inds < 0) | (inds >= limit)
    if out.any():
        raise ValueError(
            f"{what} rows {inds[out][:8].tolist()} ({int(out.sum())} of this batch) are out "
            f"of range [0, {limit}); check inds, or the batches' total against the size "
            f"given when the store was set up ({what} set size {limit})."
        )
    unique, counts = np.unique(inds, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"inds holds duplicates {unique[counts > 1][:8].tolist()}; each row "
                         "of a batch must be a different example: drop the repeats.")
    return inds.astype(np.int64)


def todo(batch: tuple, inds: np.ndarray, done: np.ndarray):
    """``(work, rows)``: the part of the batch whose rows are not done, padded to a
    power-of-two size by repeating its first example, and those rows; ``(None, None)``
    when all are done."""
    left = np.flatnonzero(done[inds] == 0)
    if left.size == 0:
        return None, None
    if left.size == len(inds):
        return batch, inds
    padded = min(len(inds), 1 << int(math.ceil(math.log2(left.size))))
    take = np.concatenate([left, np.full(padded - left.size, left[0])])
    return tuple(a[take] for a in batch), inds[left]


def _raise_nonfinite(what: str, rows, bad) -> None:
    raise NonFiniteError(
        f"{what} of examples {rows[bad][:8].tolist()} ({int(bad.sum())} in this batch) hold "
        "NaN or Inf; nothing of this batch was written. Fix those examples (or the model "
        "on them), or pass TRAKer(..., nonfinite='zero') to store them as zero rows "
        "(score 0) and be told how many."
    )


def finish_rows(rows: np.ndarray, work: tuple, results: dict[str, np.ndarray], kind: str,
                mode: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Zero or refuse non-finite rows; returns (results, done flags ``(R,) u1``).

    The inputs are examined only when a result is non-finite (to name the cause), so
    clean batches pay nothing for it; a non-finite input that reaches no result cannot
    change any score.
    """
    found = {name: nonfinite_rows(values) for name, values in results.items()}
    bad = np.logical_or.reduce(list(found.values()))
    if bad.any() and mode == "raise":
        inputs = nonfinite_rows(*(a[: len(rows)] for a in work)) & bad
        if inputs.any():
            _raise_nonfinite("inputs", rows, inputs)
        name = next(name for name, rows_bad in found.items() if rows_bad.any())
        _raise_nonfinite(name, rows, found[name])
    if bad.any():
        results = {name: np.where(bad.reshape((-1,) + (1,) * (v.ndim - 1)), 0, v)
                   .astype(v.dtype) for name, v in results.items()}
        warnings.warn(
            f"{int(bad.sum())} {kind} examples hold NaN or Inf in their inputs, outputs or "
            f"gradients (e.g. {rows[bad][:8].tolist()}); stored as zero rows (score 0) as "
            "nonfinite='zero' asks. TRAKer.zeroed_rows lists them all.",
            NonFiniteWarning, stacklevel=4)
    return results, np.where(bad, 2, 1).astype(np.uint8)


class Progress:
    """tqdm bars of rows stored, one per label (a checkpoint's featurize or score run),
    created only when asked for."""

    def __init__(self, enabled: bool):
        self.enabled = bool(enabled)
        self._bar = None

    def advance(self, label: str, done: np.ndarray, count: int) -> None:
        """Move the bar of ``label`` by ``count`` newly stored rows (0 before a batch's
        work, so that the rate counts from the first batch)."""
        if not self.enabled:
            return
        if self._bar is None or self._bar.desc != label:
            if self._bar is not None:
                self._bar.close()
            from tqdm.auto import tqdm  # only when asked for

            self._bar = tqdm(total=len(done), initial=int(np.count_nonzero(done)) - count,
                             desc=label, unit="rows", dynamic_ncols=True)
        if count:
            self._bar.update(count)
        if self._bar.n >= self._bar.total:
            self._bar.close()
            self._bar = None


def write_batch(store, arrays: dict, batch: tuple, inds: np.ndarray, compute, names: dict,
                *, kind: str, mode: str, progress: Progress, label: str) -> None:
    """Compute and store the rows of ``batch`` that are not done yet.

    Args:
      store: the :class:`~trax_attr.store.Store`; arrays: its row arrays, with ``done``.
      batch, inds: the batch and its row numbers (:func:`batch_rows`).
      compute: ``compute(work) -> {name: (B', ...) array}`` for a padded part of the batch.
      names: ``{array name: what it holds}`` of the results to store, for messages.
      kind: "training" or "target"; mode: the nonfinite policy.
    """
    work, rows = todo(batch, inds, arrays["done"])
    if work is None:
        return
    progress.advance(label, arrays["done"], 0)
    values = compute(work)
    results, flags = finish_rows(
        rows, work, {names[name]: np.asarray(values[name])[: len(rows)] for name in names},
        kind, mode)
    store.write_rows(arrays, rows, dict(zip(names, results.values())), flags)
    progress.advance(label, arrays["done"], len(rows))
