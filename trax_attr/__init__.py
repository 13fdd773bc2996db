"""trax_attr: TRAK training-data attribution, JAX-native.

The workflow shell is :class:`TRAKer`; the pure functional core is :func:`featurize`,
:func:`trak_scores` and the projection functions; tasks extend :class:`ModelOutput`.
"""

from .checks import NonFiniteError
from .checks import NonFiniteWarning
from .features import IllConditionedWarning
from .features import featurize
from .features import inverse_gram
from .features import solve
from .features import xtx
from .gradients import select
from .models import Model
from .models import as_model
from .models import callable_model
from .models import linen_model
from .models import nnx_model
from .projection import Projector
from .projection import identity
from .projection import materialize
from .projection import normal
from .projection import project
from .projection import projection_cache
from .projection import projection_key
from .projection import rademacher
from .structured import KroneckerProjector
from .structured import kronecker
from .scoring import score_block
from .store import StoreBusyError
from .store import StoreWriteError
from .scoring import trak_scores
from .sharding import TopK
from .sharding import default_mesh
from .tasks import CLIP
from .tasks import TASKS
from .tasks import BinaryClassification
from .tasks import CausalLM
from .tasks import CLIPBank
from .tasks import ImageClassification
from .tasks import ModelOutput
from .tasks import TextClassification
from .tasks import clip_embedding_bank
from .tasks import get_task
from .tasks import out_to_loss_from_loss
from .traker import TRAKer

__version__ = "0.1.0"

__all__ = [
    "BinaryClassification",
    "CLIP",
    "CLIPBank",
    "CausalLM",
    "IllConditionedWarning",
    "KroneckerProjector",
    "ImageClassification",
    "Model",
    "ModelOutput",
    "NonFiniteError",
    "NonFiniteWarning",
    "Projector",
    "StoreBusyError",
    "StoreWriteError",
    "TASKS",
    "TRAKer",
    "TextClassification",
    "TopK",
    "as_model",
    "callable_model",
    "clip_embedding_bank",
    "default_mesh",
    "featurize",
    "get_task",
    "identity",
    "inverse_gram",
    "kronecker",
    "linen_model",
    "materialize",
    "nnx_model",
    "normal",
    "out_to_loss_from_loss",
    "project",
    "projection_cache",
    "projection_key",
    "rademacher",
    "score_block",
    "select",
    "solve",
    "trak_scores",
    "xtx",
]
