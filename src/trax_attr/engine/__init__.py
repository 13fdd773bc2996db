"""The engine: pure kernels of TRAK, one copy each.

* :mod:`.featurize`: φ and Q of a batch (:class:`Featurizer`, :class:`Checkpoint`);
* :mod:`.linalg`: XᵀX per chunk, λ, and (XᵀX + λI)⁻¹ in float64;
* :mod:`.scores`: fold targets with A, score a chunk of rows, top-k.

:mod:`trax_attr.parallel` wraps them in ``shard_map`` over a mesh; the functional core
(:mod:`trax_attr.core`) and the TRAKer's streamed store path (:mod:`trax_attr.pipeline`)
both call those wrappers.
"""

from .featurize import Checkpoint, Featurizer, Resident, bucket, features, host_features, prepare
from .linalg import (AUTO, IllConditionedWarning, check_lambda, gram_block, inverse,
                     inverse_gram, resolve_lambda)
from .scores import TopK, fold_targets, merge_topk, row_weights, score_block, topk_block

__all__ = ["AUTO", "Checkpoint", "Featurizer", "IllConditionedWarning", "Resident", "TopK",
           "bucket",
           "check_lambda", "features", "fold_targets", "gram_block", "host_features",
           "inverse", "inverse_gram", "merge_topk", "prepare", "resolve_lambda",
           "row_weights", "score_block", "topk_block"]
