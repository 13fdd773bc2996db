"""torch modules as trax_attr Models: converted to JAX (route 1) or run in torch (route 2).

Both routes split a checkpoint the same way: ``params`` is a dict of jax arrays named as in
``module.state_dict()`` (the module's parameters), ``state`` the floating-point buffers
(BatchNorm running statistics; non-persistent buffers such as open_clip's ``attn_mask``,
which a state_dict does not hold, come from the module), held fixed. So parameter
selection (``grad_wrt`` patterns such as ``"fc.*"``), fingerprints, and the projection
key's assignment of matrix rows to parameters are identical in both routes: with the same
seed they project with the same matrix. Both call the module the way the tasks call
models (:mod:`.conventions`: HuggingFace models by keyword, their ``.logits``).

* ``backend="converted"``: ``apply`` is the module converted to jnp (:mod:`.convert`);
* ``backend="torch"``: ``apply`` is the module run by torch as a differentiable JAX
  function (:mod:`.callback`): its forward and VJP are torch calls inside
  ``jax.pure_callback``, so every task, built-in or custom, works unchanged and the
  per-example gradients are torch's (``torch.func.vmap`` over ``torch.func.vjp``).

Everything else (the task's output and out-to-loss term, projection, sharding, the store)
is the core's, as for a JAX model.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import torch
from torch import nn

from trax_attr.models import Model
from trax_attr.models.checkpoints import CheckpointMismatchError

from .conventions import PREFIX, Called, needs_convention
from .convert import convert
from .callback import torch_function

__all__ = ["torch_model", "load_state_dict", "BACKENDS"]

BACKENDS = ("converted", "torch")


def load_state_dict(checkpoint, module: nn.Module) -> dict[str, torch.Tensor]:
    """Resolve a torch checkpoint to a state_dict checked against ``module``.

    Args:
      checkpoint: ``None`` (the module's own weights), a state_dict, an ``nn.Module`` of
        the same architecture, or a path to a file saved with ``torch.save(state_dict)``
        (read with ``torch.load(weights_only=True)``: no code is unpickled).
      module: the architecture the checkpoint must fit.

    Returns:
      ``{name: tensor}`` for every entry of ``module.state_dict()``, floating tensors in
      the module's dtypes (a float16 checkpoint of a float32 module is cast, as
      ``module.load_state_dict`` does).

    Raises:
      CheckpointMismatchError: (a ValueError) names missing from or unexpected in the
        checkpoint and shapes that differ, all in one message.
      TypeError: a checkpoint of another kind.
    """
    if checkpoint is None:
        state = module.state_dict()
    elif isinstance(checkpoint, (str, os.PathLike)):
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if not isinstance(state, Mapping):
            raise TypeError(
                f"checkpoint file {str(checkpoint)!r} holds a {type(state).__name__}, not a "
                "state_dict; save it with torch.save(model.state_dict(), path)."
            )
    elif isinstance(checkpoint, nn.Module):
        state = checkpoint.state_dict()
    elif isinstance(checkpoint, Mapping):
        state = checkpoint
    else:
        raise TypeError(
            f"a torch checkpoint must be a state_dict, a path to one, an nn.Module or None; "
            f"got {type(checkpoint).__name__}."
        )
    return _checked(state, module)


def _checked(state: Mapping, module: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` checked against ``module.state_dict()`` in names and shapes (all the
    differences in one message), its floating tensors in the module's dtypes as
    ``module.load_state_dict`` would copy them; a missing ``num_batches_tracked`` (a
    counter no forward pass reads) is the module's."""
    expected = module.state_dict()
    missing = [name for name in expected if name not in state
               and not name.endswith("num_batches_tracked")]
    unexpected = [name for name in state if name not in expected]
    shapes = [f"{name}: {tuple(state[name].shape)} vs {tuple(value.shape)}"
              for name, value in expected.items()
              if name in state and tuple(state[name].shape) != tuple(value.shape)]
    if missing or unexpected or shapes:
        shown = lambda names: ", ".join(names[:8]) + (  # noqa: E731
            f" ... ({len(names)} in all)" if len(names) > 8 else "")
        lines = ([f"missing from the checkpoint: {shown(missing)}"] if missing else []) + (
            [f"in the checkpoint but not the module: {shown(unexpected)}"] if unexpected
            else []) + ([f"shapes differ (checkpoint vs module): {shown(shapes)}"] if shapes
                        else [])
        raise CheckpointMismatchError(
            f"the checkpoint does not fit {type(module).__name__}: {'; '.join(lines)}."
            f"{_hint(state, expected)} Pass a state_dict of this architecture "
            "(model.state_dict() of the model trained).")
    out = {}
    for name, value in expected.items():
        tensor = state.get(name, value)
        if tensor.is_floating_point() and value.is_floating_point():
            tensor = tensor.to(value.dtype)  # as load_state_dict copies into the module
        out[name] = tensor
    return out


def _hint(state: Mapping, expected: Mapping) -> str:
    """The usual causes of names that differ: a wrapper's prefix, a training checkpoint
    holding the state_dict under a key."""
    names = list(state)
    for prefix in ("module.", "_orig_mod.", "model."):
        if names and all(name.startswith(prefix) for name in names) and any(
                name[len(prefix):] in expected for name in names):
            wrapper = {"module.": "a DataParallel wrapper", "_orig_mod.": "torch.compile",
                       "model.": "a wrapper module"}[prefix]
            return (f" The names start with {prefix!r} ({wrapper}): strip that prefix, "
                    f"{{k.removeprefix({prefix!r}): v for k, v in state.items()}}.")
    nested = [key for key, value in state.items() if isinstance(value, Mapping)
              and any(name in expected for name in value)]
    if nested:
        return (f" The checkpoint holds the state_dict under {nested[0]!r} (a training "
                f"checkpoint): pass checkpoint[{nested[0]!r}].")
    return ""


def _to_jax(tensor: torch.Tensor) -> jax.Array:
    # A copy on purpose: torch may change its tensors in place later (training), and jax
    # arrays must not change under the store's fingerprint.
    return jnp.array(jax.dlpack.from_dlpack(tensor.detach().contiguous()), copy=True)


def _prefixed(apply):
    """``apply`` of the :class:`Called` wrapper as a function of the module's own names."""

    def renamed(params, state, *inputs):
        return apply({PREFIX + k: v for k, v in params.items()},
                     {PREFIX + k: v for k, v in (state or {}).items()}, *inputs)

    return renamed


def torch_model(module: nn.Module, backend: str = "converted") -> Model:
    """Wrap a ``torch.nn.Module`` for trax_attr; ``TRAKer(model=module)`` calls this.

    Args:
      module: the architecture, evaluated in eval mode (a copy; the module is not
        changed). Checkpoints are its state_dicts, paths to them, or modules of the
        same architecture (see :func:`load_state_dict`); ``None`` means its own weights.
        HuggingFace models are called by keyword (see :mod:`.conventions`).
      backend: ``"converted"`` (the module converted to a JAX function) or ``"torch"``
        (the module run by torch, forward and VJP, as a JAX function).

    Returns:
      a :class:`trax_attr.Model` whose params are ``{named_parameters name: (shape) f32}``
      and state ``{float buffer name: array}``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}.")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not known; use one of {list(BACKENDS)}.")
    evaluated = copy.deepcopy(module).eval()
    param_names = [name for name, _ in evaluated.named_parameters()]
    buffers = {name: b for name, b in evaluated.named_buffers() if b.is_floating_point()}

    def split(checkpoint):
        state = load_state_dict(checkpoint, evaluated)
        return ({name: _to_jax(state[name]) for name in param_names},
                {name: _to_jax(state[name] if name in state else buffer)
                 for name, buffer in buffers.items()})

    name = f"{type(module).__name__} (torch, backend={backend})"
    if backend == "converted":
        if needs_convention(evaluated):
            return Model(_prefixed(convert(Called(evaluated))), split, name)
        return Model(convert(evaluated), split, name)
    return Model(_prefixed(torch_function(Called(evaluated), name=name)), split, name)
