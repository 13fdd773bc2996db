"""Flax models as TRAK sees them: flax.nnx modules and flax.linen modules.

* a ``flax.nnx.Module``: put in eval mode (running averages, deterministic dropout) and
  split with ``nnx.split(module, nnx.Param, ...)``; checkpoints are modules of the same
  structure, ``nnx.State`` of their parameters or of all variables, the same as nested
  dicts of arrays (``nnx.to_pure_dict``, or an orbax checkpoint restored without
  ``like``), or ``None`` (the module's own weights). RNG state (``nnx.Rngs`` of Dropout) is
  part of ``state``: it is held fixed, never differentiated, and unused in eval mode.
* a ``flax.linen.Module``: checkpoints are variables dicts ``{'params': ..., 'batch_stats':
  ...}``; pass call options such as ``train=False`` with :func:`linen_model`. A bound
  module (``module.bind(variables)``) is unbound, its variables the default checkpoint.

Every checkpoint is checked against the model, the differing leaves named
(:class:`~trax_attr.models.checkpoints.CheckpointMismatchError`): nnx checkpoints and
those of a bound linen module when loaded; those of an unbound linen module, whose shapes
follow from its inputs, against ``module.init``'s (abstractly, nothing is computed) when the
first batch is traced.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from .base import Model, _hashable, _is_subclass
from .checkpoints import (CheckpointMismatchError, _leaves, _pure, _without_value_level,
                          leaf_differences)
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
        elif isinstance(checkpoint, (nnx.State, Mapping)):
            if not isinstance(checkpoint, nnx.State):
                checkpoint = _state_of(module, checkpoint)
            params, state = nnx.split_state(checkpoint, nnx.Param, ...)
            if not jax.tree_util.tree_leaves(state):
                # parameters only: keep the module's own non-parameter state
                _, _, state = nnx.split(module, nnx.Param, ...)
        else:
            raise TypeError(
                f"an nnx model's checkpoint must be an nnx.Module of the same structure, an "
                f"nnx.State (or its nested dict of arrays) or None; got "
                f"{type(checkpoint).__name__}. Save with nnx.state(model) and pass that "
                "State, or pass the trained module itself; an orbax directory: "
                "trax_attr.models.checkpoints.load_checkpoint_dir(path, like=model).")
        differences = (leaf_differences(params, own_params)
                       + leaf_differences(state, own_state, got_name="checkpoint's state",
                                          want_name="model's"))
        if differences:
            raise CheckpointMismatchError(
                f"the checkpoint does not fit {type(module).__name__}: "
                f"{'; '.join(differences)}. Pass the state of a model of this architecture "
                "(nnx.state(trained_model)).")
        return params, state

    # equal graph definitions compute the same function of (params, state)
    return Model(apply, split, type(module).__name__,
                 apply_tapped=nnx_apply_tapped(graphdef), cache_key=("nnx", graphdef))


def _state_of(module, pure: Mapping):
    """An ``nnx.State`` of ``module``'s structure holding the nested dict ``pure`` (of all
    its variables, or of its parameters only), checked leaf by leaf."""
    from flax import nnx

    pure = _without_value_level(pure)  # orbax restores a saved State with 'value' levels
    full, params = nnx.state(module), nnx.state(module, nnx.Param)
    like = params if set(_leaves(pure)) <= set(_leaves(_pure(params))) else full
    differences = leaf_differences(pure, like)
    if differences:
        raise CheckpointMismatchError(
            f"the checkpoint (a dict of arrays) does not fit {type(module).__name__}: "
            f"{'; '.join(differences)}. Pass the state of a model of this architecture "
            "(nnx.state(trained_model), or nnx.to_pure_dict of it).")
    state = jax.tree.map(lambda leaf: leaf, like)  # a copy: the module is left as it was
    nnx.replace_by_pure_dict(state, pure)
    return state


def linen_model(module, **apply_kwargs) -> Model:
    """Wrap a ``flax.linen.Module``; ``apply_kwargs`` go to every call (e.g. train=False).

    A bound module's checkpoints are checked against its variables when loaded; an unbound
    module's against the variables ``module.init`` makes for the first batch's inputs
    (:func:`jax.eval_shape`: shapes only), when that batch is traced.
    """
    from flax import errors as flax_errors

    bound_variables = None
    if module.scope is not None:  # bound: use the unbound module, its variables by default
        module, bound_variables = module.unbind()
    name = type(module).__name__
    options = "".join(f", {k}={v!r}" for k, v in sorted(apply_kwargs.items()))
    fix = (f"Pass the variables of this architecture, as {name}(...).init(key, x{options}) "
           "makes them (and training updates them): {'params': ..., 'batch_stats': ...}.")

    def mismatch(differences, when=""):
        return CheckpointMismatchError(
            f"the checkpoint does not fit {name}{when}: {'; '.join(differences)}. {fix}")

    def call(params, state, *inputs):
        try:
            return module.apply({"params": params, **state}, *inputs, **apply_kwargs)
        except flax_errors.ScopeCollectionNotFound as err:
            found = re.search(r'collection "([^"]+)"', str(err))
            col = repr(found.group(1)) if found else "a"
            raise mismatch([f"it has no {col} collection, which {name} reads"]) from None
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

    def check(params, state, inputs) -> None:
        """Refuse variables that differ from those ``module.init`` makes for ``inputs``
        (every collection the checkpoint holds, and 'params'); shapes only."""
        if bound_variables is not None:
            return  # checked when loaded
        specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)),
                             inputs)

        def init(*xs):
            key = jax.random.key(0)
            return module.init({"params": key, "dropout": key}, *xs, **apply_kwargs)

        try:
            made = jax.eval_shape(init, *specs)
        except Exception:  # noqa: BLE001 - cannot init on these inputs: apply says why
            return
        variables = {"params": params, **state}
        made = {col: tree for col, tree in made.items() if col == "params" or col in variables}
        differences = leaf_differences(variables, made, want_name=f"{name} on this batch")
        if differences:
            raise mismatch(differences, when=" (checked against module.init on the first "
                           "batch's shapes)")

    def apply(params, state, *inputs):
        check(params, state, inputs)
        return call(params, state, *inputs)

    tapped = linen_apply_tapped(call)

    def apply_tapped(params, state, tap, *inputs):
        check(params, state, inputs)  # outside the taps: init must not report layers
        return tapped(params, state, tap, *inputs)

    def split(checkpoint):
        if checkpoint is None and bound_variables is not None:
            checkpoint = bound_variables
        if not isinstance(checkpoint, Mapping) or "params" not in checkpoint:
            raise TypeError(
                f"a linen model's checkpoint must be a variables dict with a 'params' entry "
                f"(as returned by module.init); got {type(checkpoint).__name__}"
                + (f" with keys {sorted(checkpoint)}" if isinstance(checkpoint, Mapping) else "")
                + ". Pass {'params': params, 'batch_stats': ...}"
                + (" (this looks like the 'params' collection alone: wrap it as {'params': "
                   "checkpoint}, with the 'batch_stats' of a BatchNorm model)"
                   if isinstance(checkpoint, Mapping) and checkpoint
                   and all(isinstance(v, Mapping) for v in checkpoint.values()) else "")
                + "."
            )
        if bound_variables is not None and checkpoint is not bound_variables:
            differences = leaf_differences(checkpoint, bound_variables,
                                           want_name="bound module's variables")
            if differences:
                raise mismatch(differences)
        state = {key: value for key, value in checkpoint.items() if key != "params"}
        return checkpoint["params"], state

    # linen modules are frozen dataclasses: equal fields, equal function
    key = ("linen", module, tuple(sorted(apply_kwargs.items())), bound_variables is None)
    return Model(apply, split, name, apply_tapped=apply_tapped,
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
