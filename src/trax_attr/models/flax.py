"""Flax models as TRAK sees them: flax.nnx modules and flax.linen modules.

* a ``flax.nnx.Module``: put in eval mode (running averages, deterministic dropout) and
  split with ``nnx.split(module, nnx.Param, ...)``; checkpoints are modules of the same
  structure, ``nnx.State`` of their parameters or of all variables, or ``None`` (the
  module's own weights). RNG state (``nnx.Rngs`` of Dropout) is part of ``state``: it is
  held fixed, never differentiated, and unused in eval mode.
* a ``flax.linen.Module``: checkpoints are variables dicts ``{'params': ..., 'batch_stats':
  ...}``; pass call options such as ``train=False`` with :func:`linen_model`. A bound
  module (``module.bind(variables)``) is unbound, its variables the default checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax

from .base import Model, _hashable, _is_subclass
from .checkpoints import leaf_differences
from .taps import linen_apply_tapped, nnx_apply_tapped

__all__ = ["nnx_model", "linen_model", "adapt"]


def nnx_model(module) -> Model:
    """Wrap a ``flax.nnx.Module``; evaluated in eval mode with non-Param state fixed."""
    from flax import nnx

    evaluated = nnx.merge(*nnx.split(module))  # a copy: the user's module is not touched
    evaluated.eval()
    graphdef, _, _ = nnx.split(evaluated, nnx.Param, ...)

    def apply(params, state, *inputs):
        return nnx.merge(graphdef, params, state)(*inputs)

    _, own_params, own_state = nnx.split(module, nnx.Param, ...)  # the structure to fit

    def split(checkpoint):
        if checkpoint is None:
            checkpoint = module  # its weights now (it may have been trained since)
        if isinstance(checkpoint, nnx.Module):
            _, params, state = nnx.split(checkpoint, nnx.Param, ...)
        elif isinstance(checkpoint, nnx.State):
            params, state = nnx.split_state(checkpoint, nnx.Param, ...)
            if not jax.tree_util.tree_leaves(state):
                # parameters only: keep the module's own non-parameter state
                _, _, state = nnx.split(module, nnx.Param, ...)
        else:
            raise TypeError(
                f"an nnx model's checkpoint must be an nnx.Module of the same structure, an "
                f"nnx.State or None; got {type(checkpoint).__name__}. Save with "
                "nnx.state(model) and pass that State, or pass the trained module itself; "
                "an orbax directory: trax_attr.models.checkpoints.load_checkpoint_dir(path, "
                "like=model).")
        differences = (leaf_differences(params, own_params)
                       + leaf_differences(state, own_state, got_name="checkpoint's state",
                                          want_name="model's"))
        if differences:
            raise ValueError(
                f"the checkpoint does not fit {type(module).__name__}: "
                f"{'; '.join(differences)}. Pass the state of a model of this architecture "
                "(nnx.state(trained_model)).")
        return params, state

    # equal graph definitions compute the same function of (params, state)
    return Model(apply, split, type(module).__name__,
                 apply_tapped=nnx_apply_tapped(graphdef), cache_key=("nnx", graphdef))


def linen_model(module, **apply_kwargs) -> Model:
    """Wrap a ``flax.linen.Module``; ``apply_kwargs`` go to every call (e.g. train=False)."""
    from flax import errors as flax_errors

    bound_variables = None
    if module.scope is not None:  # bound: use the unbound module, its variables by default
        module, bound_variables = module.unbind()
    name = type(module).__name__

    def apply(params, state, *inputs):
        try:
            return module.apply({"params": params, **state}, *inputs, **apply_kwargs)
        except flax_errors.ModifyScopeVariableError as err:
            raise ValueError(
                f"{name} tried to update a variable collection while TRAK evaluates it "
                f"({err}); it runs in training mode. Pass "
                f"model=trax_attr.linen_model(module, train=False) (or the keyword your "
                "module uses for evaluation mode) so that BatchNorm uses its running "
                "statistics and dropout is off.") from None
        except TypeError as err:
            if "required" in str(err) and "argument" in str(err):
                raise TypeError(
                    f"calling {name}(inputs) failed: {err}. Pass the call options with "
                    "model=trax_attr.linen_model(module, train=False) (any keyword "
                    "arguments of its __call__).") from None
            raise

    def split(checkpoint):
        if checkpoint is None and bound_variables is not None:
            checkpoint = bound_variables
        if not isinstance(checkpoint, Mapping) or "params" not in checkpoint:
            raise TypeError(
                f"a linen model's checkpoint must be a variables dict with a 'params' entry "
                f"(as returned by module.init); got {type(checkpoint).__name__}"
                + (f" with keys {sorted(checkpoint)}" if isinstance(checkpoint, Mapping) else "")
                + ". Pass {'params': params, 'batch_stats': ...}."
            )
        state = {key: value for key, value in checkpoint.items() if key != "params"}
        return checkpoint["params"], state

    # linen modules are frozen dataclasses: equal fields, equal function
    key = ("linen", module, tuple(sorted(apply_kwargs.items())))
    return Model(apply, split, name, apply_tapped=linen_apply_tapped(apply),
                 cache_key=key if _hashable(key) else None)


def adapt(model, backend) -> Model | None:
    """The Flax adapter of :func:`~trax_attr.models.as_model`: None for other models."""
    # decided from the class's bases, so a linen model does not import flax.nnx (0.7 s)
    is_nnx = _is_subclass(type(model), "flax.nnx", "Module")
    if not (is_nnx or _is_subclass(type(model), "flax.linen", "Module")):
        return None
    if backend is not None:
        raise ValueError(
            f"backend={backend!r} applies to torch modules only; got a "
            f"{type(model).__name__}. Leave backend=None for JAX and Flax models."
        )
    return nnx_model(model) if is_nnx else linen_model(model)
