"""How closely two score matrices agree (torch vs JAX, two settings, two libraries)."""

from __future__ import annotations

import dataclasses

import numpy as np

from .lds import as_2d, pearson_columns, spearman_columns

__all__ = ["ScoreAgreement", "compare_scores"]


# --- agreement of two score matrices ---------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ScoreAgreement:
    """How closely scores ``a`` agree with reference scores ``b (n_train, n_targets)``.

    The one comparison of two score matrices: ``trax-attr compare``, the demo's torch
    run and ``interop.compare`` all return it; ``print`` it (or call :meth:`table`).

    Attributes (each ``(n_targets,) f64`` unless noted):
      pearson, spearman: correlations of column j of a and of b over training examples
        (NaN where a column is constant, so a correlation is undefined).
      top_proponents, top_opponents: |top-k(a_j) ∩ top-k(b_j)| / k of the k highest
        (proponents) and the k lowest (opponents) scores.
      sign_agreement: fraction of training examples where sign(a) == sign(b).
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

    @property
    def topk_overlap(self) -> np.ndarray:
        """Alias of ``top_proponents`` ``(n_targets,) f64`` (the name before opponents)."""
        return self.top_proponents

    def rows(self) -> list[tuple[str, np.ndarray, str]]:
        """``(metric name, (n_targets,) values, format spec)`` of each table row."""
        # correlations with 8 digits: twins agree in their 5th to 7th digit
        return [("pearson", self.pearson, ".8f"), ("spearman", self.spearman, ".8f"),
                (f"top-{self.k} proponents", self.top_proponents, ".3f"),
                (f"top-{self.k} opponents", self.top_opponents, ".3f"),
                ("sign agreement", self.sign_agreement, ".4f"),
                ("max rel diff", self.max_rel_diff, ".2e")]

    def table(self) -> str:
        """A plain-text table: each metric's mean, min, median and max over targets
        (NaN entries left out; a metric with none finite shows ``nan``)."""
        lines = [f"{'over ' + str(len(self.pearson)) + ' targets':<18}"
                 + "".join(f"{h:>13}" for h in ("mean", "min", "median", "max"))]
        for name, values, spec in self.rows():
            finite = values[np.isfinite(values)]
            if finite.size:
                stats = (finite.mean(), finite.min(), np.median(finite), finite.max())
                lines.append(f"{name:<18}" + "".join(f"{v:>13{spec}}" for v in stats))
            else:
                lines.append(f"{name:<18}" + "".join(f"{'nan':>13}" for _ in range(4)))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _overlap(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    top_a = np.argsort(-a, axis=0, kind="stable")[:k]
    top_b = np.argsort(-b, axis=0, kind="stable")[:k]
    return np.array([np.intersect1d(top_a[:, j], top_b[:, j]).size / k
                     for j in range(a.shape[1])], np.float64)


def compare_scores(a, b, *, k: int = 10) -> ScoreAgreement:
    """How far scores ``a`` agree with reference scores ``b``, per target (numpy only).

    Args:
      a: ``(n_train, n_targets)`` scores, e.g. from a torch model.
      b: ``(n_train, n_targets)`` reference scores (the scale of ``max_rel_diff``).
      k: size of the top-k sets of proponents and opponents (1..n_train).

    Returns:
      a :class:`ScoreAgreement`; ``print(...)`` shows mean / min / median / max over targets.
    """
    a = as_2d("a", a, np.float64)
    b = as_2d("b", b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"score matrices differ in shape: a {a.shape}, b {b.shape}; compare "
                         "scores of the same training set and targets.")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= a.shape[0]:
        raise ValueError(f"k must be an integer in [1, n_train={a.shape[0]}], got {k!r}.")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("scores a and b must be finite; they hold NaN or Inf (rows "
                         f"{np.flatnonzero(~(np.isfinite(a) & np.isfinite(b)).all(1))[:5].tolist()}"
                         "...). Score a finalized experiment or drop those rows.")
    scale = np.abs(b).max(axis=0)
    diff = np.abs(a - b).max(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(scale > 0, diff / scale, np.where(diff > 0, np.inf, 0.0))
    return ScoreAgreement(
        pearson=pearson_columns(a, b),
        spearman=spearman_columns(a, b),
        top_proponents=_overlap(a, b, k),
        top_opponents=_overlap(-a, -b, k),
        sign_agreement=(np.sign(a) == np.sign(b)).mean(axis=0),
        max_rel_diff=rel,
        k=int(k),
    )
