"""Checkpoints as users keep them: orbax checkpoint directories, without pickle.

A params pytree in memory needs nothing from here: pass it to ``TRAKer.load_checkpoint``.
For a checkpoint directory written by orbax (flax's standard, e.g.
``ocp.StandardCheckpointer().save(path, nnx.state(model))``), :func:`load_checkpoint_dir`
restores it, into the structure of an nnx model when one is given. torch state_dicts go
through the interop package.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["load_checkpoint_dir", "save_checkpoint_dir"]


def _pure(checkpoint) -> Any:
    from flax import nnx

    if isinstance(checkpoint, nnx.Module):
        checkpoint = nnx.state(checkpoint)
    if isinstance(checkpoint, nnx.State):
        return nnx.to_pure_dict(checkpoint)
    return checkpoint


def save_checkpoint_dir(path: str | os.PathLike, checkpoint) -> Path:
    """Write ``checkpoint`` (an nnx Module or State, or a pytree of arrays) as an orbax
    checkpoint directory at ``path``; an existing one is replaced. Returns the path."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, _pure(checkpoint), force=True)
    checkpointer.wait_until_finished()
    return path


def load_checkpoint_dir(path: str | os.PathLike, like=None):
    """Restore an orbax checkpoint directory.

    Args:
      path: the directory written by orbax (``StandardCheckpointer`` / ``save_checkpoint_dir``).
      like: optional ``nnx.Module`` or ``nnx.State`` of the same model: the checkpoint is
        then returned as an ``nnx.State`` of that structure, ready for
        ``TRAKer.load_checkpoint``.

    Returns:
      the restored pytree (nested dicts of arrays), or an ``nnx.State`` with ``like``.
    """
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    path = Path(path).absolute()
    if not path.is_dir():
        raise FileNotFoundError(
            f"checkpoint directory {str(path)!r} does not exist; pass the folder given to "
            "orbax's save (it holds _CHECKPOINT_METADATA or a 'default' item)."
        )
    restored = ocp.StandardCheckpointer().restore(path)
    if like is None:
        return restored
    if isinstance(like, nnx.Module):
        like = nnx.state(like)
    if not isinstance(like, nnx.State):
        raise TypeError(
            f"like must be an nnx.Module or nnx.State, got {type(like).__name__}; omit it to "
            "get the restored pytree as it is."
        )
    # a copy, so that the caller's model or State is left as it was
    state = jax.tree.map(lambda leaf: leaf, like)
    try:
        nnx.replace_by_pure_dict(state, restored)
    except (KeyError, ValueError) as err:
        raise ValueError(
            f"checkpoint {str(path)!r} does not fit the structure of like ({err}); pass a "
            "model of the architecture that was saved."
        ) from None
    return state
