"""What a model is to TRAK: a pure apply function and a checkpoint splitter.

``params`` are the trainable parameters TRAK differentiates; ``state`` is everything else
a checkpoint holds (BatchNorm statistics, other collections), held fixed. Adapters turn
the models users bring (:mod:`.flax`, plain functions here, torch modules in
:mod:`trax_attr.interop`) into a :class:`Model`; :func:`as_model` picks the adapter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from importlib import metadata
from typing import Any

__all__ = ["Model", "as_model", "callable_model", "register_adapter", "is_torch_module"]


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A model seen by TRAK. Hashable: equal ``cache_key``, equal model (jit-static).

    Attributes:
      apply: ``apply(params, state, *inputs) -> outputs``, inputs with a batch axis.
      split: ``split(checkpoint) -> (params, state)``.
      name: what the model is, for messages.
      host_grads: optional ``host_grads(task, params, state, batch, paths,
        with_out_to_loss) -> (grads, q)`` for models differentiated outside JAX: ``paths``
        are the names of the selected params leaves (``Selection.paths``), ``grads`` one
        ``(B, size)`` array per path in that order, ``q`` the ``(B,)`` out-to-loss terms
        (``None`` when ``with_out_to_loss`` is false), as jax or numpy arrays; it is
        called outside ``jit``. ``None`` (the default): jitted JAX gradients of ``apply``.
      apply_tapped: optional ``apply_tapped(params, state, tap, *inputs)``, ``apply`` that
        calls ``y = tap(kernel_path, x, y)`` on each covered layer (y = x W + b) and goes
        on with the returned y; needed by the kronecker projector. The contract and the
        Flax layers covered are in :mod:`trax_attr.models.taps`.
      cache_key: optional hashable value naming what ``apply`` (and ``apply_tapped``)
        compute: Models with equal keys are equal, so TRAKers of one process whose models,
        tasks, parameter selections and projectors are equal share compiled functions.
        ``None`` (the default): a Model equals only itself.
    """

    apply: Callable[..., Any]
    split: Callable[[Any], tuple[Any, Any]]
    name: str
    host_grads: Callable[..., tuple[Any, Any]] | None = None
    apply_tapped: Callable[..., Any] | None = None
    cache_key: Hashable | None = None

    def __eq__(self, other) -> bool:
        if self is other:
            return True
        return (isinstance(other, Model) and self.cache_key is not None
                and self.cache_key == other.cache_key)

    def __hash__(self) -> int:
        return hash(("Model", self.cache_key)) if self.cache_key is not None else id(self)


def _hashable(value) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


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


# Adapters of other frameworks: fn(model, backend) -> Model, or None when the model is
# not theirs. Registered by the packages that know the framework (trax_attr.interop for
# torch registers itself when imported); the entry-point group "trax_attr.adapters" names
# them by the framework's package, imported the first time a model of that package occurs.
_ADAPTERS: list[Callable[[Any, str | None], Model | None]] = []


def register_adapter(adapter: Callable[[Any, str | None], Model | None]) -> None:
    """Teach :func:`as_model` a kind of model: ``adapter(model, backend)`` returns a
    :class:`Model`, or None when ``model`` is not of its kind."""
    if adapter not in _ADAPTERS:
        _ADAPTERS.append(adapter)


def _load_entry_points(model) -> bool:
    """Import the adapters registered (entry-point group ``trax_attr.adapters``) under the
    name of a package ``model``'s class comes from, e.g. ``torch``; whether any loaded."""
    roots = {cls.__module__.split(".")[0] for cls in type(model).__mro__}
    loaded = False
    for entry in metadata.entry_points(group="trax_attr.adapters"):
        if entry.name in roots:
            try:
                entry.load()  # importing the package registers its adapter
                loaded = True
            except ImportError:  # its extra is not installed
                continue
    return loaded


def is_torch_module(model) -> bool:
    """Whether ``model`` is a ``torch.nn.Module``, decided without importing torch."""
    return any(cls.__name__ == "Module" and cls.__module__ == "torch.nn.modules.module"
               for cls in type(model).__mro__)


def _adapt(model, backend):
    for adapter in list(_ADAPTERS):
        found = adapter(model, backend)
        if found is not None:
            return found
    return None


def _class_message(cls: type) -> str:
    """What to pass instead of the class ``cls`` (model=CNN rather than model=CNN(...))."""
    name = cls.__name__
    if _is_subclass(cls, "flax.nnx", "Module"):
        example = (f"model={name}(..., rngs=nnx.Rngs(0)) (then its trained weights: "
                   "load_checkpoint(nnx.state(trained)) or the trained module itself)")
    elif _is_subclass(cls, "flax.linen", "Module"):
        example = (f"model=trax_attr.linen_model({name}(...), train=False) (a linen module "
                   "with the keyword its __call__ takes for evaluation mode), and its "
                   "variables {'params': ..., 'batch_stats': ...} as checkpoints")
    elif _is_subclass(cls, "torch.nn", "Module"):
        example = f"model={name}(...) (then its state_dict as checkpoints)"
    else:
        example = f"model={name}(...)"
    return f"model={name} is a class, not a model: pass an instance, e.g. {example}."


def _is_subclass(cls: type, package: str, name: str) -> bool:
    """Whether ``cls`` derives from ``package``'s class ``name``, without importing it."""
    return any(base.__name__ == name and base.__module__.startswith(package)
               for base in cls.__mro__)


def as_model(model, backend: str | None = None) -> Model:
    """Resolve ``model=``: a Model, an nnx or linen Module, a torch Module, or
    ``apply_fn(params, *inputs)``.

    Args:
      model: the model.
      backend: for torch modules only: ``"converted"`` (default, the module converted to
        a JAX function) or ``"torch"`` (gradients in torch); see
        ``trax_attr.interop.torch_model``.
    """
    from . import flax as flax_adapters

    if isinstance(model, Model):
        if backend is not None:
            raise ValueError(f"backend={backend!r} applies to torch modules only; this is "
                             "already a trax_attr.Model. Leave backend=None.")
        return model
    found = flax_adapters.adapt(model, backend)
    if found is None:
        found = _adapt(model, backend)
    if found is None and _load_entry_points(model):
        found = _adapt(model, backend)
    if found is not None:
        return found
    if is_torch_module(model):
        raise TypeError(
            f"{type(model).__name__} is a torch.nn.Module, but the torch bridge is not "
            "installed: pip install 'trax_attr[interop]' (then import trax_attr.interop, or "
            "reinstall trax_attr so that its entry point is found).")
    if backend is not None:
        raise ValueError(
            f"backend={backend!r} applies to torch modules only; got a "
            f"{type(model).__name__}. Leave backend=None for JAX and Flax models."
        )
    if isinstance(model, type):
        raise TypeError(_class_message(model))
    if callable(model):
        return callable_model(model)
    raise TypeError(
        f"model must be a flax.nnx.Module, a flax.linen.Module, a function "
        f"apply_fn(params, *inputs), a torch.nn.Module or a trax_attr.Model; got "
        f"{type(model).__name__}."
    )
