"""interop: the PyTorch bridge of trax_attr, and the only code that imports torch.

* ``TRAKer(model=torch_module, backend="converted" | "torch")`` goes through
  :func:`torch_model` (the module converted to JAX, or run by torch as a differentiable
  JAX function, :func:`torch_function`): importing this package registers it with
  :func:`trax_attr.register_adapter` (``trax_attr.as_model`` imports it through the
  ``trax_attr.adapters`` entry point when it first meets a torch module);
* :func:`torch_to_flax` / :func:`flax_to_torch` move weights between twins;
* :func:`compare` tells how far two score matrices agree.

Install with the ``interop`` extra (``pip install trax_attr[interop]``, torch==2.13.0).
"""

try:
    import torch  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "interop needs torch: install the extra with `pip install 'trax_attr[interop]'` "
        "(torch==2.13.0)."
    ) from err

from .compare import Comparison
from .compare import compare
from .convert import UnsupportedOpError
from .convert import convert
from .models import load_state_dict
from .models import torch_model
from .callback import torch_function
from .weights import flax_to_torch
from .weights import torch_to_flax
from ..models import register_adapter as _register_adapter


def _adapt(model, backend):
    """The torch adapter of :func:`trax_attr.as_model`: None for other models."""
    if not isinstance(model, torch.nn.Module):
        return None
    return torch_model(model, backend="converted" if backend is None else backend)


_register_adapter(_adapt)

__all__ = [
    "Comparison",
    "UnsupportedOpError",
    "compare",
    "convert",
    "flax_to_torch",
    "load_state_dict",
    "torch_function",
    "torch_model",
    "torch_to_flax",
]
