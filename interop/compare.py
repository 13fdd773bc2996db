"""Compare two score matrices: are two attributions the same, target by target?"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.stats import rankdata

__all__ = ["Comparison", "compare"]


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Per-target agreement of scores ``a`` with reference scores ``b``; ``print`` it.

    Attributes (each ``(n_targets,)`` float64 unless noted):
      pearson, spearman: correlations over the training examples.
      top_proponents, top_opponents: |top-k(a) ∩ top-k(b)| / k of the k highest
        (proponents) and lowest (opponents) scores.
      sign_agreement: fraction of training examples whose scores have the same sign.
      max_rel_diff: max_i |a_ij - b_ij| / max_i |b_ij|, the largest difference relative
        to the target's score scale (entry-wise ratios would blow up near zero scores).
      k: the k of the top-k overlaps (int).
    """

    pearson: np.ndarray
    spearman: np.ndarray
    top_proponents: np.ndarray
    top_opponents: np.ndarray
    sign_agreement: np.ndarray
    max_rel_diff: np.ndarray
    k: int

    def __str__(self) -> str:
        # correlations with 8 digits: agreement is often in their 5th to 7th digit
        rows = [("Pearson", self.pearson, ".8f"), ("Spearman", self.spearman, ".8f"),
                (f"top-{self.k} proponents overlap", self.top_proponents, ".3f"),
                (f"top-{self.k} opponents overlap", self.top_opponents, ".3f"),
                ("sign agreement", self.sign_agreement, ".4f"),
                ("max relative difference", self.max_rel_diff, ".2e")]
        width = max(len(name) for name, _, _ in rows)
        lines = [f"{'over ' + str(len(self.pearson)) + ' targets':<{width}}  "
                 f"{'min':>12} {'median':>12} {'max':>12}"]
        for name, values, spec in rows:
            lines.append(f"{name:<{width}}  {values.min():>12{spec}} "
                         f"{np.median(values):>12{spec}} {values.max():>12{spec}}")
        return "\n".join(lines)


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(0)
    b = b - b.mean(0)
    denom = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (a * b).sum(0) / denom, np.nan)


def _overlap(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    top_a = np.argsort(-a, axis=0, kind="stable")[:k]
    top_b = np.argsort(-b, axis=0, kind="stable")[:k]
    return np.array([len(np.intersect1d(top_a[:, j], top_b[:, j])) / k
                     for j in range(a.shape[1])])


def compare(scores_a, scores_b, *, k: int = 10) -> Comparison:
    """How far scores ``a`` agree with reference scores ``b``, per target.

    Args:
      scores_a: ``(n_train, n_targets)`` scores, e.g. from a torch model.
      scores_b: ``(n_train, n_targets)`` reference scores, e.g. from its Flax twin.
      k: size of the top-k sets of proponents and opponents.

    Returns:
      a :class:`Comparison`; ``print(...)`` shows min / median / max over targets.
    """
    a = np.asarray(scores_a, np.float64)
    b = np.asarray(scores_b, np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"scores_a and scores_b must be (n_train, n_targets) arrays of one shape; got "
            f"{a.shape} and {b.shape}. Pass the two finalize_scores results."
        )
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= a.shape[0]:
        raise ValueError(f"k must be an integer in [1, n_train={a.shape[0]}], got {k!r}.")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("scores_a and scores_b must be finite; they hold NaN or Inf.")
    scale = np.abs(b).max(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(scale > 0, np.abs(a - b).max(0) / scale,
                       np.where(np.abs(a - b).max(0) > 0, np.inf, 0.0))
    return Comparison(
        pearson=_pearson(a, b),
        spearman=_pearson(rankdata(a, axis=0), rankdata(b, axis=0)),
        top_proponents=_overlap(a, b, k),
        top_opponents=_overlap(-a, -b, k),
        sign_agreement=(np.sign(a) == np.sign(b)).mean(0),
        max_rel_diff=rel,
        k=int(k),
    )
