"""Evaluation: the linear datamodeling score (LDS), counterfactual retraining, baselines.

LDS (Park et al. 2023, section 2.2) asks how well attribution scores predict what happens
when the model is retrained on a subset of its training set. For random subsets
S_1..S_s (``masks``, each an alpha-fraction of the training set) and the margins of
models retrained on each (``margins``), the prediction of subset s for target j is the
sum of the scores of the examples it keeps, ``(masks @ scores)[s, j]``; the LDS of target
j is the Spearman rank correlation, over subsets, between predictions and margins; the
LDS is its mean over targets.

Everything here is host-side numpy except the retraining, which trains all models at once
(``jax.vmap`` over models, ``optax``) and is deterministic from its key.

* :mod:`.lds`: the LDS and rank correlations;
* :mod:`.retraining`: counterfactual retraining of small nnx models on random subsets;
* :mod:`.baselines`: gradient dot product, cosine and random scores;
* :mod:`.agreement`: how closely two score matrices agree.
"""

from .agreement import ScoreAgreement
from .agreement import compare_scores
from .baselines import grad_cosine_scores
from .baselines import grad_dot_scores
from .baselines import random_scores
from .lds import LDSResult
from .lds import lds
from .lds import rank_average
from .lds import spearman_columns
from .retraining import MLP
from .retraining import nnx_margins
from .retraining import subset_retraining
from .retraining import train_nnx_models

__all__ = [
    "LDSResult",
    "MLP",
    "ScoreAgreement",
    "compare_scores",
    "grad_cosine_scores",
    "grad_dot_scores",
    "lds",
    "nnx_margins",
    "random_scores",
    "rank_average",
    "spearman_columns",
    "subset_retraining",
    "train_nnx_models",
]
