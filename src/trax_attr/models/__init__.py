"""Model adapters: every supported model becomes ``apply(params, state, *inputs)``.

* :mod:`.base`: :class:`Model`, :func:`as_model`, plain functions, the adapter registry;
* :mod:`.flax`: flax.nnx and flax.linen modules;
* :mod:`.taps`: the layer reports the kronecker projector needs;
* :mod:`.checkpoints`: orbax checkpoint directories.

torch modules are adapted by :mod:`trax_attr.interop`, which registers itself
(``register_adapter``) when imported; ``import trax_attr`` never imports it.
"""

from .base import Model, as_model, callable_model, is_torch_module, register_adapter
from .flax import linen_model, nnx_model

__all__ = ["Model", "as_model", "callable_model", "is_torch_module", "linen_model",
           "nnx_model", "register_adapter"]
