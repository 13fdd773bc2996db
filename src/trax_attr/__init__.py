"""trax_attr: TRAK training-data attribution, JAX-native.

The workflow shell is :class:`TRAKer`; the pure functional core is :func:`featurize`,
:func:`trak_scores` and the projection functions; tasks extend :class:`ModelOutput`.
"""

from .batches import NonFiniteError
from .batches import NonFiniteWarning
from .core import featurize
from .core import solve
from .core import trak_scores
from .core import xtx
from .engine import IllConditionedWarning
from .engine import TopK
from .engine import inverse_gram
from .engine import resolve_lambda
from .engine import score_block
from .gradients import select
from .models import Model
from .models import as_model
from .models import callable_model
from .models import linen_model
from .models import nnx_model
from .models import register_adapter
from .parallel import default_mesh
from .projection import DenseProjector
from .projection import IdentityProjector
from .projection import KroneckerProjector
from .projection import LayerInfo
from .projection import Projector
from .projection import identity
from .projection import kronecker
from .projection import materialize
from .projection import normal
from .projection import project
from .projection import projection_cache
from .projection import projection_key
from .projection import rademacher
from .settings import Settings
from .store import StoreBusyError
from .store import StoreCorruptedError
from .store import StoreWriteError
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
    "DenseProjector",
    "IdentityProjector",
    "IllConditionedWarning",
    "ImageClassification",
    "KroneckerProjector",
    "LayerInfo",
    "Model",
    "ModelOutput",
    "NonFiniteError",
    "NonFiniteWarning",
    "Projector",
    "Settings",
    "StoreBusyError",
    "StoreCorruptedError",
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
    "register_adapter",
    "resolve_lambda",
    "score_block",
    "select",
    "solve",
    "trak_scores",
    "xtx",
]
