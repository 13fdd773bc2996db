"""Checkpoints as users keep them: orbax checkpoint directories, without pickle.

A params pytree in memory needs nothing from here: pass it to ``TRAKer.load_checkpoint``.
:func:`load_checkpoint_dir` restores what the Flax guides save:

* ``ocp.StandardCheckpointer().save(path, nnx.state(model))`` (or of ``nnx.split``'s
  state, or :func:`save_checkpoint_dir`): pass ``like=model`` to get an ``nnx.State`` of
  the model's structure;
* a ``CheckpointManager`` directory (``path/<step>/<item>``): the latest step, or
  ``step=``; the step's one item, or ``item=``;
* a linen variables dict ``{'params': ..., 'batch_stats': ...}``: ``like=variables``
  (e.g. ``module.init(...)``) checks it against the model and restores it as a dict.

With ``like``, the checkpoint is checked against the model before it is used: a missing,
unexpected or reshaped leaf is named (:func:`leaf_differences`). torch state_dicts go
through the interop package.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["load_checkpoint_dir", "save_checkpoint_dir", "leaf_differences",
           "CheckpointMismatchError"]

_METADATA = "_CHECKPOINT_METADATA"


class CheckpointMismatchError(ValueError):
    """A checkpoint whose leaves differ from the model's, the differing leaves named.

    Raised by the adapters' ``split`` when a checkpoint is loaded, or, for models whose
    shapes are known only from inputs (an unbound linen module), when the first batch is
    traced; never rephrased as a problem of the batch."""


def _pure(checkpoint) -> Any:
    from flax import nnx

    if isinstance(checkpoint, nnx.Module):
        checkpoint = nnx.state(checkpoint)
    if isinstance(checkpoint, nnx.State):
        return nnx.to_pure_dict(checkpoint)
    return checkpoint


def _leaves(tree) -> dict[str, tuple]:
    """``{'a/b': (shape, dtype name)}`` of a pytree's array leaves (keys: their key data)."""
    import jax

    from ..gradients import leaf_path

    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype,
                                                                 jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        shape = tuple(getattr(leaf, "shape", ()))
        dtype = getattr(getattr(leaf, "dtype", None), "name", type(leaf).__name__)
        out[leaf_path(path)] = (shape, dtype)
    return out


def leaf_differences(got, want, *, got_name: str = "checkpoint", want_name: str = "model",
                     limit: int = 8) -> list[str]:
    """What differs between two pytrees' leaves: missing, unexpected, other shapes.

    Args:
      got, want: pytrees of arrays (nnx States as pure dicts or with their Variables).
      got_name, want_name: how the messages name them.
      limit: names listed per kind of difference.

    Returns:
      one line per kind of difference (empty when names and shapes agree).
    """
    a, b = _leaves(_pure(got)), _leaves(_pure(want))

    def shown(names):
        names = sorted(names)
        return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit
                                          else "")

    lines = []
    if missing := set(b) - set(a):
        lines.append(f"missing from the {got_name}: {shown(missing)}")
    if unexpected := set(a) - set(b):
        lines.append(f"in the {got_name} but not the {want_name}: {shown(unexpected)}")
    shapes = [f"{k}: {a[k][0]} vs {b[k][0]}" for k in sorted(set(a) & set(b))
              if a[k][0] != b[k][0]]
    if shapes:
        lines.append(f"shapes differ ({got_name} vs {want_name}): {', '.join(shapes[:limit])}"
                     + (" ..." if len(shapes) > limit else ""))
    return lines


def save_checkpoint_dir(path: str | os.PathLike, checkpoint) -> Path:
    """Write ``checkpoint`` (an nnx Module or State, or a pytree of arrays) as an orbax
    checkpoint directory at ``path``; an existing one is replaced. Returns the path."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, _pure(checkpoint), force=True)
    checkpointer.wait_until_finished()
    return path


def _resolve(path: Path, step: int | None, item: str | None) -> Path:
    """The directory holding one pytree: a checkpoint, a manager's step, or its item."""
    if not path.is_dir():
        raise FileNotFoundError(
            f"checkpoint directory {str(path)!r} does not exist; pass the folder given to "
            "orbax's save (or a CheckpointManager's directory).")
    steps = sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit())
    if steps and not (path / "_METADATA").exists():  # a CheckpointManager's directory
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise ValueError(f"step={step} is not in {str(path)!r}; its steps are {steps}.")
        path = path / str(step)
    elif step is not None:
        raise ValueError(f"step={step} was given, but {str(path)!r} is not a "
                         "CheckpointManager directory (no numbered step folders).")
    if (path / "_METADATA").exists():
        return path
    items = sorted(p.name for p in path.iterdir() if p.is_dir() and (p / "_METADATA").exists())
    if item is not None:
        if item not in items:
            raise ValueError(f"item={item!r} is not in {str(path)!r}; its items are {items}.")
        return path / item
    if len(items) == 1:
        return path / items[0]
    raise ValueError(
        f"{str(path)!r} holds no single orbax pytree (items: {items or 'none'}); pass the "
        "checkpoint's folder, or item= to choose one of a CheckpointManager step's items.")


def _without_value_level(tree):
    """A restored ``nnx.State`` (``{'kernel': {'value': array}}``) as a pure dict."""
    if isinstance(tree, Mapping):
        if set(tree) == {"value"} and not isinstance(tree["value"], Mapping):
            return tree["value"]
        return {key: _without_value_level(value) for key, value in tree.items()}
    return tree


def load_checkpoint_dir(path: str | os.PathLike, like=None, *, step: int | None = None,
                        item: str | None = None):
    """Restore an orbax checkpoint directory, checked against the model when given.

    Args:
      path: the directory given to ``StandardCheckpointer().save`` (or
        :func:`save_checkpoint_dir`), or a ``CheckpointManager``'s directory, or one step
        of it.
      like: optional model to check and shape the checkpoint with: an ``nnx.Module`` or
        ``nnx.State`` (the result is an ``nnx.State`` of that structure, ready for
        ``TRAKer.load_checkpoint``), or a pytree of arrays such as a linen variables dict
        (the result is a pytree of the same structure).
      step: for a CheckpointManager directory, the step (default: the latest).
      item: for a step with several items, the one to restore (default: the only one).

    Returns:
      the restored pytree (nested dicts of arrays; a saved nnx.State keeps its ``'value'``
      levels), or with ``like`` an ``nnx.State`` / pytree of ``like``'s structure.

    Raises:
      CheckpointMismatchError: (a ValueError) with ``like``, the leaves that differ
        (missing, unexpected, shapes).
    """
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    folder = _resolve(Path(path).absolute(), step, item)
    restored = ocp.StandardCheckpointer().restore(folder)
    if like is None:
        return restored
    if isinstance(like, nnx.Module):
        like = nnx.state(like)
    pure = _without_value_level(restored)
    differences = leaf_differences(pure, like)
    if differences:
        raise CheckpointMismatchError(
            f"checkpoint {str(folder)!r} does not fit the model given as like: "
            f"{'; '.join(differences)}. Pass a model of the architecture that was saved "
            "(the same layers and sizes).")
    if isinstance(like, nnx.State):
        state = jax.tree.map(lambda leaf: leaf, like)  # a copy: like is left as it was
        nnx.replace_by_pure_dict(state, pure)
        return state
    treedef = jax.tree_util.tree_structure(like)
    flat = dict(jax.tree_util.tree_flatten_with_path(pure)[0])
    return jax.tree_util.tree_unflatten(
        treedef, [flat[path] for path, _ in jax.tree_util.tree_flatten_with_path(like)[0]])
