"""``interop.compare``: the one score comparison of trax_attr, under the interop name.

The implementation lives in :func:`trax_attr.evaluation.compare_scores` (numpy only, so
``trax-attr compare`` and the core need no torch); this module only re-exports it.
"""

from __future__ import annotations

from trax_attr.evaluation import ScoreAgreement
from trax_attr.evaluation import compare_scores

__all__ = ["Comparison", "compare"]

#: The result of :func:`compare`; the same class as ``trax_attr.evaluation.ScoreAgreement``.
Comparison = ScoreAgreement


def compare(scores_a, scores_b, *, k: int = 10) -> ScoreAgreement:
    """How far scores ``a`` agree with reference scores ``b``, per target.

    Same as :func:`trax_attr.evaluation.compare_scores` (see there).

    Args:
      scores_a: ``(n_train, n_targets)`` scores, e.g. from a torch model.
      scores_b: ``(n_train, n_targets)`` reference scores, e.g. from its Flax twin.
      k: size of the top-k sets of proponents and opponents.
    """
    return compare_scores(scores_a, scores_b, k=k)
