"""Parameter selection and per-example gradients of a task's model output.

The parameters TRAK differentiates are chosen BEFORE differentiation (``grad_wrt``), so
gradients are never computed for parameters that would be thrown away.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .models import Model
from .tasks import ModelOutput

__all__ = ["Selection", "select", "leaf_path", "per_example_grads", "output_fn"]

GradWrt = None | str | Sequence[str] | Callable[[str, Any], bool]


def leaf_path(path) -> str:
    """'/'-joined name of a pytree path, without the ``.value`` of flax Variables."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.GetAttrKey) and key.name == "value":
            continue
        parts.append(jax.tree_util.keystr((key,), simple=True, separator="/"))
    return "/".join(parts)


class Selection(NamedTuple):
    """Which leaves of a params pytree are differentiated.

    Attributes:
      treedef: structure of the full params pytree.
      selected: flat indices of the differentiated leaves, in tree order.
      paths: names of the selected leaves.
      sizes: number of entries of each selected leaf; d = sum(sizes).
    """

    treedef: Any
    selected: tuple[int, ...]
    paths: tuple[str, ...]
    sizes: tuple[int, ...]

    @property
    def grad_dim(self) -> int:
        return int(sum(self.sizes))

    def split(self, params) -> tuple[tuple, tuple]:
        """params -> (selected leaves, other leaves), both tuples of arrays."""
        leaves = self.treedef.flatten_up_to(params)
        chosen = set(self.selected)
        return (tuple(leaves[i] for i in self.selected),
                tuple(leaf for i, leaf in enumerate(leaves) if i not in chosen))

    def check_same(self, other: "Selection") -> None:
        """Refuse ``other`` (another checkpoint's selection) unless it has the same
        leaves: names and sizes."""
        if (other.paths, other.sizes) == (self.paths, self.sizes):
            return
        first = set(zip(self.paths, self.sizes))
        diffs = [f"{p}: {s}" for p, s in zip(other.paths, other.sizes) if (p, s) not in first]
        raise ValueError(
            "this checkpoint's parameters differ in names or shapes from the first "
            f"checkpoint's (differing: {', '.join(diffs[:8]) or 'parameter count'}). All "
            "checkpoints of one TRAKer must be of the same architecture.")

    def merge(self, selected: Sequence, rest: Sequence):
        """Inverse of :meth:`split`."""
        chosen = dict(zip(self.selected, selected))
        rest_iter = iter(rest)
        leaves = [chosen[i] if i in chosen else next(rest_iter)
                  for i in range(self.treedef.num_leaves)]
        return self.treedef.unflatten(leaves)


def select(params, grad_wrt: GradWrt = None) -> Selection:
    """Choose the leaves of ``params`` to differentiate.

    Args:
      params: the trainable parameters pytree.
      grad_wrt: ``None`` for all leaves; a glob pattern or list of patterns matched
        against leaf paths such as ``"Dense_1/kernel"`` or ``"head/*"``; or a predicate
        ``fn(path, leaf) -> bool``.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [leaf_path(path) for path, _ in flat]
    if grad_wrt is None:
        chosen = list(range(len(flat)))
    elif callable(grad_wrt):
        chosen = [i for i, (p, (_, leaf)) in enumerate(zip(paths, flat)) if grad_wrt(p, leaf)]
    else:
        patterns = [grad_wrt] if isinstance(grad_wrt, str) else list(grad_wrt)
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise TypeError(
                f"grad_wrt must be None, a glob pattern, a list of patterns or a predicate "
                f"fn(path, leaf); got {grad_wrt!r}."
            )
        chosen = [i for i, p in enumerate(paths)
                  if any(fnmatch.fnmatchcase(p, pat) for pat in patterns)]
    if not chosen:
        shown = ", ".join(paths[:12]) + (", ..." if len(paths) > 12 else "")
        raise ValueError(
            f"grad_wrt={grad_wrt!r} selects no parameter. Parameter paths are: {shown}. "
            "Use patterns like 'layer/*' or '*kernel'."
        )
    sizes = tuple(int(np.prod(np.shape(flat[i][1]), dtype=np.int64)) for i in chosen)
    return Selection(treedef, tuple(chosen), tuple(paths[i] for i in chosen), sizes)


def output_fn(task: ModelOutput, model: Model, selection: Selection):
    """``f(selected, rest, state, example) -> ()``: the task's output of one example."""

    def output(selected, rest, state, example):
        def apply_fn(sel, *inputs):
            return model.apply(selection.merge(sel, rest), state, *inputs)

        return task.get_output(apply_fn, selected, *example)

    return output


def out_to_loss_fn(task: ModelOutput, model: Model, selection: Selection):
    """``q(selected, rest, state, batch) -> (B,)``: the task's out-to-loss term."""

    def out_to_loss(selected, rest, state, batch):
        def apply_fn(sel, *inputs):
            return model.apply(selection.merge(sel, rest), state, *inputs)

        return jnp.asarray(task.get_out_to_loss_grad(apply_fn, selected, batch)).reshape(-1)

    return out_to_loss


def per_example_grads(task: ModelOutput, model: Model, selection: Selection,
                      selected, rest, state, batch) -> tuple[jax.Array, ...]:
    """Per-example gradients of the output, one ``(B, size)`` array per selected leaf."""
    grad = jax.grad(output_fn(task, model, selection))
    grads = jax.vmap(grad, in_axes=(None, None, None, 0))(selected, rest, state, batch)
    return tuple(g.reshape(g.shape[0], -1) for g in grads)
