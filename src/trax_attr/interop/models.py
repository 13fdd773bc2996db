"""torch modules as trax_attr Models: converted to JAX (route 1) or run in torch (route 2).

Both routes split a checkpoint the same way: ``params`` is a dict of jax arrays named as in
``module.state_dict()`` (the module's parameters), ``state`` the floating-point buffers
(BatchNorm running statistics), held fixed. So parameter selection (``grad_wrt``
patterns such as ``"fc.*"``), fingerprints, and the projection key's assignment of
matrix rows to parameters are identical in both routes: with the same seed they project
with the same matrix.

* ``backend="converted"``: ``apply`` is the module's fx graph interpreted in jnp
  (:mod:`interop.convert`); everything else is the core's jitted path.
* ``backend="torch"``: ``apply`` is not used; ``Model.host_grads`` computes per-example
  gradients with ``torch.func.vmap(torch.func.grad(...))`` over ``functional_call`` and
  the out-to-loss term in torch, and hands them to the core's projection through DLPack
  (no copy on CPU: the jax array aliases the torch tensor's memory).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import torch
from torch import nn

from trax_attr.models import Model
from trax_attr.tasks import ImageClassification, ModelOutput

from .convert import convert

__all__ = ["torch_model", "load_state_dict", "TorchImageClassification", "TORCH_TASKS",
           "BACKENDS"]

BACKENDS = ("converted", "torch")


def load_state_dict(checkpoint, module: nn.Module) -> dict[str, torch.Tensor]:
    """Resolve a torch checkpoint to a state_dict checked against ``module``.

    Args:
      checkpoint: ``None`` (the module's own weights), a state_dict, an ``nn.Module`` of
        the same architecture, or a path to a file saved with ``torch.save(state_dict)``
        (read with ``torch.load(weights_only=True)``: no code is unpickled).
      module: the architecture the checkpoint must fit.

    Raises:
      ValueError: names missing from or unexpected in the checkpoint, or shapes that differ.
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
    expected = module.state_dict()
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    if missing or unexpected:
        hint = ""
        if unexpected and all(name.startswith("module.") for name in unexpected):
            hint = " The names start with 'module.' (a DataParallel wrapper): strip that prefix."
        raise ValueError(
            f"the checkpoint does not fit {type(module).__name__}: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}.{hint} Pass a state_dict of this "
            "architecture."
        )
    shapes = [f"{name}: {tuple(state[name].shape)} vs {tuple(value.shape)}"
              for name, value in expected.items() if tuple(state[name].shape) != tuple(value.shape)]
    if shapes:
        raise ValueError(
            f"the checkpoint's shapes differ from {type(module).__name__}'s (checkpoint vs "
            f"module): {', '.join(shapes[:8])}. Pass a state_dict of this architecture."
        )
    return dict(state)


def _to_jax(tensor: torch.Tensor) -> jax.Array:
    # A copy on purpose: torch may change its tensors in place later (training), and jax
    # arrays must not change under the store's fingerprint.
    return jnp.array(jax.dlpack.from_dlpack(tensor.detach().contiguous()), copy=True)


def _to_torch(array, device) -> torch.Tensor:
    """A jax or numpy array as a torch tensor, sharing memory where DLPack allows."""
    if not isinstance(array, jax.Array):
        array = jnp.asarray(array)
    return torch.from_dlpack(array).to(device)


# --- tasks written in torch, for backend="torch" ------------------------------------------

def classification_margin(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """g_y - logsumexp_{j≠y} g_j of one example: ``logits (C,)``, ``label ()`` -> ``()``."""
    is_label = torch.arange(logits.shape[-1], device=logits.device) == label
    correct = torch.where(is_label, logits, torch.zeros_like(logits)).sum()
    return correct - torch.logsumexp(logits.masked_fill(is_label, float("-inf")), dim=-1)


def one_minus_p(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """1 - softmax(g / T)_y of a batch, ``(B, C), (B,)`` -> ``(B,)``, without cancellation."""
    scaled = logits / temperature
    is_label = torch.arange(scaled.shape[-1], device=scaled.device)[None, :] == labels[:, None]
    others = scaled.masked_fill(is_label, float("-inf"))
    return torch.exp(torch.logsumexp(others, dim=-1) - torch.logsumexp(scaled, dim=-1))


@dataclasses.dataclass(frozen=True)
class TorchImageClassification:
    """:class:`trax_attr.ImageClassification` written in torch.

    A torch task has the two methods of :class:`trax_attr.ModelOutput`, over torch tensors:
    ``get_output(call, params, *example) -> ()`` for ONE example and
    ``get_out_to_loss_grad(call, params, batch) -> (B,)``, where
    ``call(params, *inputs)`` is ``torch.func.functional_call`` of the module.
    """

    loss_temperature: float = 1.0

    def get_output(self, call, params, image, label):
        return classification_margin(call(params, image.unsqueeze(0))[0], label.long())

    def get_out_to_loss_grad(self, call, params, batch):
        images, labels = batch
        return one_minus_p(call(params, images), labels.long(), self.loss_temperature)


TORCH_TASKS: dict[type, Callable[[ModelOutput], Any]] = {
    ImageClassification: lambda task: TorchImageClassification(task.loss_temperature),
}


def _torch_task(task: ModelOutput, torch_task):
    if torch_task is not None:
        return torch_task
    build = TORCH_TASKS.get(type(task))
    if build is None:
        raise ValueError(
            f"task {task!r} has no torch implementation for backend=\"torch\" (known: "
            f"{[t.__name__ for t in TORCH_TASKS]}). Pass torch_task=<object with get_output "
            "and get_out_to_loss_grad in torch> to interop.torch_model, or use "
            "backend=\"converted\"."
        )
    return build(task)


# --- the adapter ---------------------------------------------------------------------------

def torch_model(module: nn.Module, backend: str = "converted", *, torch_task=None) -> Model:
    """Wrap a ``torch.nn.Module`` for trax_attr; ``TRAKer(model=module)`` calls this.

    Args:
      module: the architecture, evaluated in eval mode (a copy; the module is not
        changed). Checkpoints are its state_dicts, paths to them, or modules of the
        same architecture (see :func:`load_state_dict`); ``None`` means its own weights.
      backend: ``"converted"`` (the module converted to a JAX function; jit, vmap and
        sharding apply) or ``"torch"`` (per-example gradients computed in torch).
      torch_task: for ``backend="torch"`` and a task other than image classification:
        the task written in torch (see :class:`TorchImageClassification`).

    Returns:
      a :class:`trax_attr.Model` whose params are ``{state_dict name: (shape) f32}``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}.")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not known; use one of {list(BACKENDS)}.")
    evaluated = copy.deepcopy(module).eval()
    param_names = [name for name, _ in evaluated.named_parameters()]
    buffer_names = [name for name, b in evaluated.named_buffers() if b.is_floating_point()]

    def split(checkpoint):
        state = load_state_dict(checkpoint, evaluated)
        return ({name: _to_jax(state[name]) for name in param_names},
                {name: _to_jax(state[name]) for name in buffer_names})

    name = f"{type(module).__name__} (torch, backend={backend})"
    if backend == "converted":
        convert_apply = convert(evaluated)
        return Model(convert_apply, split, name)

    def apply(params, state, *inputs):
        raise ValueError(
            f"{name} computes its gradients in torch and has no JAX apply function; use "
            "backend=\"converted\" for a JAX function of the module."
        )

    device = next(evaluated.parameters(), torch.empty(0)).device

    def call(params, *inputs):
        return torch.func.functional_call(evaluated, params, inputs)

    def host_grads(task, params, state, batch, paths, with_out_to_loss):
        ttask = _torch_task(task, torch_task)
        tensors = {k: _to_torch(v, device) for k, v in {**state, **params}.items()}
        unknown = [p for p in paths if p not in params]
        if unknown:
            raise ValueError(f"selected parameters {unknown} are not parameters of {name}.")
        selected = {p: tensors[p] for p in paths}
        rest = {k: v for k, v in tensors.items() if k not in selected}
        example = tuple(_to_torch(a, device) for a in batch)

        def output(sel, *one):
            return ttask.get_output(call, {**rest, **sel}, *one)

        with torch.no_grad():
            in_dims = (None,) + (0,) * len(example)
            grads = torch.func.vmap(torch.func.grad(output), in_dims=in_dims)(selected, *example)
            flat = tuple(jax.dlpack.from_dlpack(grads[p].reshape(len(example[0]), -1)
                                                .contiguous()) for p in paths)
            q = None
            if with_out_to_loss:
                q = jax.dlpack.from_dlpack(
                    ttask.get_out_to_loss_grad(call, tensors, example).reshape(-1).contiguous())
        return flat, q

    return Model(apply, split, name, host_grads=host_grads)
