"""Evaluation: how good attribution scores are, and how close two sets of them are.

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
