"""Checks of user batches and computed rows, with errors that name the examples.

Host-side (numpy) checks the TRAKer runs on every batch: non-finite inputs and results,
and classification labels (dtype and range), which inside ``jit`` would otherwise be
clamped silently by JAX's gather.
"""

from __future__ import annotations

import jax
import numpy as np

from .tasks import ImageClassification

__all__ = ["NonFiniteError", "NonFiniteWarning", "NONFINITE_MODES", "nonfinite_rows",
           "check_nonfinite_mode", "check_labels", "num_classes"]

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


def num_classes(task, model, params, state, batch) -> int | None:
    """C of a classification model (from its output shape on one example), else None."""
    if not isinstance(task, ImageClassification):
        return None
    try:
        out = jax.eval_shape(model.apply, params, state, *(np.asarray(a)[:1] for a in batch[:-1]))
    except Exception:  # the model itself will raise a clearer error when it runs
        return None
    shape = getattr(out, "shape", None)
    return int(shape[-1]) if shape is not None and len(shape) == 2 else None


def check_labels(task, batch, inds: np.ndarray, classes: int | None) -> None:
    """Labels (last entry of the batch) of a classification task: integers in [0, C).

    Args:
      task: the TRAKer's task; other tasks than classification are not checked.
      batch: the user's batch, labels last, ``(B,)``.
      inds: ``(B,)`` the examples' rows, for the message.
      classes: C, or None when unknown (only the dtype is checked then).
    """
    if not isinstance(task, ImageClassification):
        return
    labels = np.asarray(batch[-1])
    if not np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_:
        raise TypeError(
            f"labels (the last array of batch) must be integers for {type(task).__name__}, got "
            f"dtype {labels.dtype}; pass class indices, e.g. labels.astype(np.int32) (not one-hot "
            "vectors or floats)."
        )
    if labels.ndim != 1:
        raise ValueError(f"labels (the last array of batch) must have shape (B,), got "
                         f"{list(labels.shape)}; pass class indices, not one-hot vectors.")
    if classes is None:
        return
    bad = (labels < 0) | (labels >= classes)
    if bad.any():
        raise ValueError(
            f"labels {labels[bad][:8].tolist()} of examples {inds[bad][:8].tolist()} "
            f"({int(bad.sum())} in this batch) are outside [0, {classes}), the model's "
            f"{classes} classes; fix those labels (JAX would silently clamp them)."
        )
