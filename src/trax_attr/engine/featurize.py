"""Featurize: the projected per-example gradients φ and out-to-loss terms Q of a batch.

A :class:`Featurizer` (task, model, parameter selection, projector) is a hashable
description: the static argument of the one jitted featurize kernel
(:func:`trax_attr.parallel.featurize`), so equal descriptions share a compiled program.
A :class:`Checkpoint` is the dynamic argument: a pytree of one checkpoint's arrays.

    φ(z) = Pᵀ ∇θ f(z; θ) / √d   (B, k) f32        Q(z) = -∂L/∂f   (B,) f32
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ..gradients import Selection, out_to_loss_fn
from ..models import Model
from ..projection import Projector, projection_key
from ..tasks import ModelOutput

__all__ = ["Featurizer", "Checkpoint", "Resident", "features", "host_features", "prepare",
           "bucket"]

# A batch is padded to an already compiled size at most this many times its own size.
_MAX_PADDING = 4


class Featurizer(NamedTuple):
    """What is fixed while featurizing with one model, task, selection and projector."""

    task: ModelOutput
    model: Model
    selection: Selection
    projector: Projector


class Checkpoint(NamedTuple):
    """One checkpoint's arrays, split for differentiation (a pytree).

    Attributes:
      selected: the differentiated params leaves, in the selection's order.
      rest: the other params leaves.
      state: the fixed model state (BatchNorm statistics, RNG state) or None.
      key: the projection key fold_in(key(seed), model_id).
      cache: what the projector keeps per checkpoint (see ``Projector.cache``), or None.
    """

    selected: tuple
    rest: tuple
    state: Any
    key: jax.Array
    cache: Any


def prepare(f: Featurizer, params, state, seed: int, model_id: int, *,
            cache: bool = True) -> Checkpoint:
    """The :class:`Checkpoint` of ``params``/``state`` under checkpoint id ``model_id``;
    with ``cache=False`` without the projector's cache (the caller adds it, e.g. one
    shared by every checkpoint object of this id: it depends on the key alone)."""
    selected, rest = f.selection.split(params)
    key = projection_key(seed, model_id)
    return Checkpoint(selected, rest, state, key,
                      f.projector.cache(key, f.selection.sizes) if cache else None)


def bucket(size: int, compiled, multiple: int = 1) -> int:
    """The batch size to pad ``size`` examples to, so that few shapes are ever compiled.

    The smallest size in ``compiled`` (those already used) that holds ``size`` rows and
    is at most 4x larger; else ``size`` itself when nothing is compiled yet (the first
    batch: later full batches reuse it, a last partial one is padded to it), else the
    next power of two. Always a multiple of ``multiple`` (the mesh's batch shards).
    Padding costs the padded rows' compute; a new shape costs a compile (seconds).
    """
    size = max(int(size), 1)
    fits = [c for c in compiled if size <= c <= _MAX_PADDING * size]
    if fits:
        return min(fits)
    chosen = size if not compiled else 1 << (size - 1).bit_length()
    return -(-chosen // multiple) * multiple


class Resident:
    """What a TRAKer keeps between batches: the batch sizes already compiled (one program
    per bucket, :func:`bucket`) and one projector cache, that of the last checkpoint id
    (P depends on the id alone: shared by featurize and score, replaced, not added to)."""

    def __init__(self):
        self.sizes: set[int] = set()
        self._kept: tuple = (None, None)  # (model_id, projector cache)

    def pad_size(self, size: int, multiple: int = 1) -> int:
        """The bucket ``size`` rows are padded to (:func:`bucket`), now compiled."""
        chosen = bucket(size, self.sizes, multiple)
        self.sizes.add(chosen)
        return chosen

    def checkpoint(self, f: Featurizer, checkpoint: Checkpoint, model_id: int) -> Checkpoint:
        """``checkpoint`` (prepared with ``cache=False``) with checkpoint ``model_id``'s
        projector cache, made once and kept until another id comes."""
        if self._kept[0] != model_id:
            self._kept = (None, None)  # free the old P before making the new one
            self._kept = (model_id, f.projector.cache(checkpoint.key, f.selection.sizes))
        return checkpoint._replace(cache=self._kept[1])


def features(f: Featurizer, checkpoint: Checkpoint, batch: tuple, *, col_start=0,
             num_cols: int | None = None) -> tuple[jax.Array, jax.Array]:
    """``(phi (B, num_cols) f32, q (B,) f32)`` of a batch; pure and jittable.

    Args:
      f: the featurizer; checkpoint: its arrays.
      batch: tuple of arrays with a leading batch axis B.
      col_start, num_cols: only these columns of φ (a proj-sharded mesh); default all k.
    """
    phi = f.projector.features(f, checkpoint, batch, col_start=col_start, num_cols=num_cols)
    q = out_to_loss_fn(f.task, f.model, f.selection)(checkpoint.selected, checkpoint.rest,
                                                     checkpoint.state, batch)
    return phi, q.astype(jnp.float32)


# one jitted projection for every host-gradient featurizer: its compilations (per
# projector and batch shape) are shared by all TRAKers of the process
@jax.jit(static_argnums=0)
def _project(projector, key, grads, cache):
    return projector.project(key, grads, cache)


def host_features(f: Featurizer, checkpoint: Checkpoint, batch: tuple
                  ) -> tuple[jax.Array, jax.Array]:
    """:func:`features` for a model with ``host_grads`` (gradients outside JAX).

    Same results, but not jittable as a whole: the gradients come from
    ``f.model.host_grads`` on the host; only the projection is jitted. Gradients handed
    over as jax arrays made with ``jax.dlpack.from_dlpack`` (the torch route) reach the
    projection without a copy.
    """
    params = f.selection.merge(checkpoint.selected, checkpoint.rest)
    grads, q = f.model.host_grads(f.task, params, checkpoint.state, batch, f.selection.paths,
                                  True)
    if len(grads) != len(f.selection.paths):
        raise ValueError(
            f"{f.model.name}.host_grads returned {len(grads)} gradient arrays for "
            f"{len(f.selection.paths)} selected parameters; it must return one (B, size) "
            "array per path, in the order of the paths it was given."
        )
    phi = _project(f.projector, checkpoint.key, tuple(jnp.asarray(g) for g in grads),
                   checkpoint.cache)
    return phi, jnp.asarray(q).reshape(-1).astype(jnp.float32)
