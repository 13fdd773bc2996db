"""The engine's kernels under ``jax.shard_map`` over a mesh: one module-level jit each.

* featurize: each device takes ``B / D`` examples of the batch (padded to a multiple of
  D) and computes their φ and Q; parameters and key are replicated. With a mesh axis
  ``"proj"`` each device also computes only ``k / P`` columns of φ (for large proj_dim).
* gram: each device multiplies its ``c / D`` rows, then ``psum`` over the mesh.
* scores, top-k: training rows over the mesh's first axis, targets over its second (if
  any); top-k keeps the k strongest rows per target per shard, then merges.

The static arguments (a hashable :class:`~trax_attr.engine.Featurizer`, the mesh) key
JAX's own compilation cache: TRAKers with equal settings share the compiled programs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ..engine import featurize as _featurize
from ..engine import linalg, scores as _scores
from ..projection import LayerInfo
from .mesh import PROJ_AXIS, rows_spec

__all__ = ["featurize", "gram", "fold", "scores", "topk", "proj_columns"]


def proj_columns(f: _featurize.Featurizer, mesh: Mesh) -> int | None:
    """Columns of φ per device along the mesh's ``"proj"`` axis, or None without one."""
    if PROJ_AXIS not in mesh.axis_names:
        return None
    parts = mesh.shape[PROJ_AXIS]
    if not f.projector.splittable:
        raise ValueError(
            f"mesh has a {PROJ_AXIS!r} axis, which splits proj_dim over devices, but this "
            "projector's columns cannot be split (identity, kronecker); use a mesh without it.")
    k = f.projector.output_dim(LayerInfo(f.selection.grad_dim))
    if k % parts:
        raise ValueError(
            f"proj_dim={k} must be a multiple of the mesh's {PROJ_AXIS!r} axis ({parts} "
            "devices) to split the projection over it; change proj_dim or the mesh.")
    return k // parts


@functools.partial(jax.jit, static_argnames=("f", "mesh"))
def featurize(f: _featurize.Featurizer, mesh: Mesh, checkpoint: _featurize.Checkpoint,
              batch: tuple):
    """``(phi (B, k) f32, q (B,) f32)`` of ``batch``, data-parallel over ``mesh``.

    Per shard: ``batch`` leaves ``(B / D, ...)``, the checkpoint replicated (its cache
    split by columns along ``"proj"``). B must be a multiple of D =
    :func:`~trax_attr.parallel.batch_shards` (:func:`~trax_attr.parallel.pad_batch`).
    """
    names = tuple(mesh.axis_names)
    batch_axes = tuple(a for a in names if a != PROJ_AXIS)
    rows = P(batch_axes)
    columns = proj_columns(f, mesh)

    def kernel(ckpt, batch):
        # Mark the replicated parameters as varying over the batch axes: otherwise the
        # transpose of their broadcast psums each per-example gradient over the devices
        # (the gradient of a replicated value is the sum over its copies).
        ckpt = ckpt._replace(selected=jax.tree.map(
            lambda a: jax.lax.pcast(a, batch_axes, to="varying"), ckpt.selected))
        if columns is None:
            return _featurize.features(f, ckpt, batch)
        start = jax.lax.axis_index(PROJ_AXIS) * columns
        return _featurize.features(f, ckpt, batch, col_start=start, num_cols=columns)

    cache_spec = P() if columns is None else P(None, PROJ_AXIS)
    ckpt_spec = _featurize.Checkpoint(P(), P(), P(), P(), cache_spec)
    out_specs = (rows, rows) if columns is None else (P(batch_axes, PROJ_AXIS), rows)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(ckpt_spec, rows),
                         out_specs=out_specs)(checkpoint, batch)


@functools.partial(jax.jit, static_argnames=("mesh",))
def gram(x: jax.Array, mesh: Mesh) -> jax.Array:
    """XᵀX ``(k, k) f32`` of ``x (c, k) f32``, c a multiple of the mesh size: per-shard
    :func:`~trax_attr.engine.gram_block`, then psum."""
    names = tuple(mesh.axis_names)

    def kernel(block):  # (c / D, k) -> (k, k), summed over the mesh
        return jax.lax.psum(linalg.gram_block(block), names)

    return jax.shard_map(kernel, mesh=mesh, in_specs=rows_spec(mesh), out_specs=P())(x)


@jax.jit
def fold(inverses: jax.Array, targets: jax.Array) -> jax.Array:
    """T_m = A_m φ_mᵀ ``(M, k, m) f32`` of ``inverses (M, k, k)`` and ``targets (M, m, k)``."""
    return jax.vmap(_scores.fold_targets)(inverses, targets)


def _score_axes(mesh: Mesh):
    """Training rows over the first mesh axis; targets over the second, if any."""
    names = mesh.axis_names
    return names[0], (names[1] if len(names) > 1 else None)


@functools.partial(jax.jit, static_argnames=("mesh",))
def scores(train: jax.Array, folded: jax.Array, weights: jax.Array, mesh: Mesh) -> jax.Array:
    """:func:`~trax_attr.engine.score_block` ``(c, m)``, rows (and targets) sharded.

    ``train (M, c, k)`` with c a multiple of the first axis, ``folded (M, k, m)`` with m a
    multiple of the second axis (if any), ``weights (c,)``.
    """
    row_axis, target_axis = _score_axes(mesh)
    return jax.shard_map(_scores.score_block, mesh=mesh,
                         in_specs=(P(None, row_axis), P(None, None, target_axis),
                                   P(row_axis)),
                         out_specs=P(row_axis, target_axis))(train, folded, weights)


@functools.partial(jax.jit, static_argnames=("mesh", "k"))
def topk(train, folded, weights, row_start, n_valid, mesh: Mesh, k: int):
    """Per target, the best ``k`` of the rows ``row_start + [0, c)``; four ``(m, kk)``
    arrays as :func:`~trax_attr.engine.topk_block`, merged over the row shards."""
    row_axis, target_axis = _score_axes(mesh)

    def kernel(f, t, w, start, valid):
        local = f.shape[1]
        rows = start + jax.lax.axis_index(row_axis) * local + jnp.arange(local)
        return _scores.topk_block(f, t, w, rows, valid, k)

    out = P(target_axis, row_axis)
    hi, hi_i, lo, lo_i = jax.shard_map(
        kernel, mesh=mesh,
        in_specs=(P(None, row_axis), P(None, None, target_axis), P(row_axis), P(), P()),
        out_specs=(out, out, out, out))(train, folded, weights, row_start, n_valid)
    return _scores.select_top(hi, hi_i, k) + _scores.select_top(lo, lo_i, k)
