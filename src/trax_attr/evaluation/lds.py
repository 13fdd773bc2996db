"""The linear datamodeling score (LDS) and the rank correlations it is built on.

LDS (Park et al. 2023, section 2.2) asks how well attribution scores predict what happens
when the model is retrained on a subset of its training set. For random subsets
S_1..S_s (``masks``, each an alpha-fraction of the training set) and the margins of
models retrained on each (``margins``), the prediction of subset s for target j is the
sum of the scores of the examples it keeps, ``(masks @ scores)[s, j]``; the LDS of target
j is the Spearman rank correlation, over subsets, between predictions and margins; the
LDS is its mean over targets.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np

__all__ = ["LDSResult", "lds", "rank_average", "spearman_columns", "pearson_columns"]


# --- ranks and correlations ------------------------------------------------------------

def rank_average(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values (s,)``, ties sharing their average rank -> ``(s,) f64``."""
    values = np.asarray(values)
    unique, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    del unique
    last = np.cumsum(counts)
    return (last - (counts - 1) / 2.0)[inverse.reshape(-1)]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denom = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denom if denom > 0 else math.nan


def _spearman(a: np.ndarray, b: np.ndarray, min_rows: int = 3) -> float:
    """Spearman of two vectors over the rows where both are finite; NaN when undefined
    (fewer than ``min_rows`` such rows, or either side constant on them)."""
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < min_rows:
        return math.nan
    a, b = a[ok], b[ok]
    if a.min() == a.max() or b.min() == b.max():
        return math.nan
    return _pearson(rank_average(a), rank_average(b))


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column pair of ``a, b (s, m)`` -> ``(m,) f64``.

    Rows where either value is NaN or infinite are left out of that column's correlation;
    a column that is constant (on its finite rows), or has fewer than 3 finite rows, gets
    NaN because its rank correlation is undefined.
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return np.array([_spearman(a[:, j], b[:, j]) for j in range(a.shape[1])], np.float64)


def pearson_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    out = np.full(a.shape[1], np.nan)
    for j in range(a.shape[1]):
        ok = np.isfinite(a[:, j]) & np.isfinite(b[:, j])
        if ok.sum() >= 2:
            out[j] = _pearson(a[ok, j], b[ok, j])
    return out


# --- LDS -------------------------------------------------------------------------------

class LDSResult(NamedTuple):
    """Linear datamodeling score with its bootstrap confidence interval.

    Attributes:
      mean: the mean over targets of the per-target Spearman correlations (NaN targets
        left out).
      low, high: bounds of the bootstrap confidence interval of ``mean``, resampling
        targets.
      per_target: ``(n_targets,) f64`` Spearman correlation of each target; NaN where it
        is undefined (see :func:`lds`).
    """

    mean: float
    low: float
    high: float
    per_target: np.ndarray


def as_2d(name: str, value, dtype=None) -> np.ndarray:
    array = np.asarray(value) if dtype is None else np.asarray(value, dtype)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array, got shape {array.shape}.")
    return array


def lds(scores, masks, margins, *, n_bootstrap: int = 1000, confidence: float = 0.95,
        seed: int = 0) -> LDSResult:
    """Linear datamodeling score of attribution ``scores`` against retrained models.

    Args:
      scores: ``(n_train, n_targets)`` attribution scores τ (any float dtype).
      masks: ``(S, n_train)`` bool, which training examples subset s kept (0/1 integers
        are accepted).
      margins: ``(S, n_targets)`` the output (e.g. margin) of the model retrained on
        subset s, on each target.
      n_bootstrap: resamples of the targets for the confidence interval (>= 1).
      confidence: level of the two-sided percentile interval, in (0, 1).
      seed: seed of the bootstrap resampling.

    Returns:
      :class:`LDSResult`. NaN handling: for each target, subsets whose prediction or
      margin is NaN or infinite (a diverged retraining) are left out; a target whose
      predictions or margins are constant over the remaining subsets, or with fewer than
      3 of them, has an undefined correlation: its ``per_target`` entry is NaN and it is
      excluded from the mean and the bootstrap. If no target is left, every field is NaN
      and a RuntimeWarning says why.
    """
    scores = as_2d("scores", scores, np.float64)
    masks = as_2d("masks", masks)
    margins = as_2d("margins", margins, np.float64)
    if masks.dtype != np.bool_:
        if not (np.issubdtype(masks.dtype, np.integer) and np.isin(masks, (0, 1)).all()):
            raise ValueError(
                f"masks must be a bool array (S, n_train), or 0/1 integers; got "
                f"{masks.dtype} values. Pass masks as returned by subset_retraining."
            )
        masks = masks.astype(bool)
    if masks.shape[1] != scores.shape[0]:
        raise ValueError(
            f"masks has {masks.shape[1]} columns but scores has {scores.shape[0]} rows; both "
            "count training examples (masks (S, n_train), scores (n_train, n_targets))."
        )
    if margins.shape != (masks.shape[0], scores.shape[1]):
        raise ValueError(
            f"margins has shape {margins.shape}, expected (S, n_targets) = "
            f"{(masks.shape[0], scores.shape[1])} from masks {masks.shape} and scores "
            f"{scores.shape}."
        )
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, (int, np.integer)) \
            or n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be a positive integer, got {n_bootstrap!r}.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence!r}.")

    # Non-finite scores of one example would poison every prediction of the subsets that
    # keep it; the product is then non-finite there and those subsets are left out.
    with np.errstate(invalid="ignore", over="ignore"):
        predictions = masks.astype(np.float64) @ scores
    per_target = spearman_columns(predictions, margins)
    valid = per_target[np.isfinite(per_target)]
    if valid.size == 0:
        warnings.warn(
            f"LDS is undefined: none of the {per_target.size} targets has a defined rank "
            "correlation (predictions or margins constant, or too few finite subsets). "
            "Check that the masks differ and that the margins vary.",
            RuntimeWarning, stacklevel=2)
        return LDSResult(math.nan, math.nan, math.nan, per_target)
    means = _bootstrap_means(valid, int(n_bootstrap), seed)
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return LDSResult(float(valid.mean()), float(low), float(high), per_target)


def _bootstrap_means(values: np.ndarray, n_bootstrap: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # chunks bound the (chunk, n) index array for large target sets
    chunk = max(1, (1 << 22) // values.size)
    out = []
    for start in range(0, n_bootstrap, chunk):
        size = min(chunk, n_bootstrap - start)
        out.append(values[rng.integers(0, values.size, (size, values.size))].mean(1))
    return np.concatenate(out)
