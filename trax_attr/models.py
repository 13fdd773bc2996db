"""Model adapters: every supported model becomes ``apply(params, state, *inputs)``.

``params`` are the trainable parameters TRAK differentiates; ``state`` is everything else
a checkpoint holds (BatchNorm statistics, other collections), held fixed. An adapter also
knows how to split one of its checkpoints into that pair.

* a plain callable ``apply_fn(params, *inputs)``: checkpoints are params pytrees;
* a ``flax.nnx.Module``: put in eval mode (running averages, deterministic dropout) and
  split with ``nnx.split(module, nnx.Param, ...)``; checkpoints are modules of the same
  structure, ``nnx.State`` of their parameters or of all variables, or ``None`` (the
  module's own weights);
* a ``flax.linen.Module``: checkpoints are variables dicts ``{'params': ..., 'batch_stats':
  ...}``; pass call options such as ``train=False`` with :func:`linen_model`;
* a ``torch.nn.Module``: handed to the ``interop`` package (recognised without importing
  torch, so that ``import trax_attr`` never loads it).

A model whose per-example gradients are computed outside JAX (torch) sets
``Model.host_grads``; TRAKer then calls it on the host instead of jitting ``apply``, and
projects its output with :func:`trax_attr.project` as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any, NamedTuple

import jax

from .taps import linen_apply_tapped, nnx_apply_tapped

__all__ = ["Model", "as_model", "callable_model", "nnx_model", "linen_model", "is_torch_module"]


class Model(NamedTuple):
    """A model seen by TRAK: a pure apply function and a checkpoint splitter.

    Attributes:
      apply: ``apply(params, state, *inputs) -> outputs``, inputs with a batch axis.
      split: ``split(checkpoint) -> (params, state)``.
      name: what the model is, for messages.
      host_grads: optional ``host_grads(task, params, state, batch, paths,
        with_out_to_loss) -> (grads, q)`` for models differentiated outside JAX: ``paths``
        are the names of the selected params leaves (``Selection.paths``), ``grads`` one
        ``(B, size)`` array per path in that order, ``q`` the ``(B,)`` out-to-loss terms
        (``None`` when ``with_out_to_loss`` is false), as jax or numpy arrays (from torch:
        ``jax.dlpack.from_dlpack``, no copy); it is called outside ``jit``. ``None`` (the
        default): jitted JAX gradients of ``apply``.
      apply_tapped: optional ``apply_tapped(params, state, tap, *inputs)``, ``apply`` that
        calls ``y = tap(kernel_path, x, y)`` on each covered layer (y = x W + b) and goes
        on with the returned y; needed by the kronecker projector. The contract and the
        Flax layers covered are in :mod:`trax_attr.taps`; linen and nnx models have it.
      cache_key: optional hashable value naming what ``apply`` (and ``apply_tapped``)
        compute: TRAKers whose models have equal keys (and equal tasks, parameter
        selections and projectors) share one compiled featurizer, so a second TRAKer in
        the same process does not trace and compile again. ``None`` (the default): this
        Model's functions are compiled for each TRAKer.
    """

    apply: Callable[..., Any]
    split: Callable[[Any], tuple[Any, Any]]
    name: str
    host_grads: Callable[..., tuple[Any, Any]] | None = None
    apply_tapped: Callable[..., Any] | None = None
    cache_key: Hashable | None = None


def callable_model(apply_fn: Callable[..., Any]) -> Model:
    """Wrap ``apply_fn(params, *inputs)``; a checkpoint is its params pytree."""

    def apply(params, state, *inputs):
        del state
        return apply_fn(params, *inputs)

    def split(checkpoint):
        if checkpoint is None:
            raise ValueError(
                "checkpoint=None, but a plain apply function has no weights of its own; "
                "pass the params pytree to load_checkpoint."
            )
        return checkpoint, None

    return Model(apply, split, getattr(apply_fn, "__name__", "apply_fn"),
                 cache_key=("callable", apply_fn) if _hashable(apply_fn) else None)


def nnx_model(module) -> Model:
    """Wrap a ``flax.nnx.Module``; evaluated in eval mode with non-Param state fixed."""
    from flax import nnx

    evaluated = nnx.merge(*nnx.split(module))  # a copy: the user's module is not touched
    evaluated.eval()
    graphdef, _, _ = nnx.split(evaluated, nnx.Param, ...)

    def apply(params, state, *inputs):
        return nnx.merge(graphdef, params, state)(*inputs)

    def split(checkpoint):
        if checkpoint is None:
            checkpoint = module
        if isinstance(checkpoint, nnx.Module):
            _, params, state = nnx.split(checkpoint, nnx.Param, ...)
            return params, state
        if isinstance(checkpoint, nnx.State):
            params, state = nnx.split_state(checkpoint, nnx.Param, ...)
            if not jax.tree_util.tree_leaves(state):
                # parameters only: keep the module's own non-parameter state
                _, _, state = nnx.split(module, nnx.Param, ...)
            return params, state
        raise TypeError(
            f"an nnx model's checkpoint must be an nnx.Module of the same structure, an "
            f"nnx.State or None; got {type(checkpoint).__name__}. Save with "
            "nnx.state(model) and pass that State, or pass the trained module itself."
        )

    # equal graph definitions compute the same function of (params, state)
    return Model(apply, split, type(module).__name__,
                 apply_tapped=nnx_apply_tapped(graphdef), cache_key=("nnx", graphdef))


def linen_model(module, **apply_kwargs) -> Model:
    """Wrap a ``flax.linen.Module``; ``apply_kwargs`` go to every call (e.g. train=False)."""

    def apply(params, state, *inputs):
        return module.apply({"params": params, **state}, *inputs, **apply_kwargs)

    def split(checkpoint):
        if not isinstance(checkpoint, Mapping) or "params" not in checkpoint:
            raise TypeError(
                f"a linen model's checkpoint must be a variables dict with a 'params' entry "
                f"(as returned by module.init); got {type(checkpoint).__name__}"
                + (f" with keys {sorted(checkpoint)}" if isinstance(checkpoint, Mapping) else "")
                + ". Pass {'params': params, 'batch_stats': ...}."
            )
        state = {name: value for name, value in checkpoint.items() if name != "params"}
        return checkpoint["params"], state

    # linen modules are frozen dataclasses: equal fields, equal function
    key = ("linen", module, tuple(sorted(apply_kwargs.items())))
    return Model(apply, split, type(module).__name__, apply_tapped=linen_apply_tapped(apply),
                 cache_key=key if _hashable(key) else None)


def _hashable(value) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def is_torch_module(model) -> bool:
    """Whether ``model`` is a ``torch.nn.Module``, decided without importing torch."""
    return any(cls.__name__ == "Module" and cls.__module__ == "torch.nn.modules.module"
               for cls in type(model).__mro__)


def as_model(model, backend: str | None = None) -> Model:
    """Resolve ``model=``: a Model, an nnx or linen Module, a torch Module, or
    ``apply_fn(params, *inputs)``.

    Args:
      model: the model.
      backend: for torch modules only: ``"converted"`` (default, the module converted to
        a JAX function) or ``"torch"`` (gradients in torch); see ``interop.torch_model``.
    """
    if is_torch_module(model):
        from interop import torch_model  # the optional torch bridge, imported on demand

        return torch_model(model, backend="converted" if backend is None else backend)
    if backend is not None:
        raise ValueError(
            f"backend={backend!r} applies to torch modules only; got a "
            f"{type(model).__name__}. Leave backend=None for JAX and Flax models."
        )
    if isinstance(model, Model):
        return model
    try:
        from flax import linen, nnx
    except ImportError:  # flax is optional for plain callables
        linen = nnx = None
    if nnx is not None and isinstance(model, nnx.Module):
        return nnx_model(model)
    if linen is not None and isinstance(model, linen.Module):
        return linen_model(model)
    if callable(model):
        return callable_model(model)
    raise TypeError(
        f"model must be a flax.nnx.Module, a flax.linen.Module or a function "
        f"apply_fn(params, *inputs), a torch.nn.Module or a trax_attr.Model; got "
        f"{type(model).__name__}."
    )
