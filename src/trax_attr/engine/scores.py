"""Scores from features: the per-chunk kernels of τ = mean_m(Φ_m A_m φ_m(z)ᵀ) · mean_m(Q_m).

With T_m = A_m φ_m(targets)ᵀ ``(k, m)`` folded once per checkpoint (:func:`fold_targets`),
a chunk of c training rows scores as

    τ[rows] = (Σ_m Φ_m[rows] T_m) · w[rows],     w = mean_m(Q_m) / M

(:func:`score_block`, :func:`row_weights`). The store path streams these kernels over row
chunks; :func:`trax_attr.trak_scores` runs the same ones over an in-memory array.
:func:`topk_block` and :func:`merge_topk` keep the k strongest rows per target instead of
the whole ``(n, m)`` matrix.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["TopK", "fold_targets", "row_weights", "score_block", "topk_block", "merge_topk",
           "select_top"]

_HIGHEST = jax.lax.Precision.HIGHEST


class TopK(NamedTuple):
    """The k strongest proponents and opponents of each target.

    Attributes:
      proponents: ``(n_targets, k) int64`` training rows with the largest scores, best first.
      proponent_scores: ``(n_targets, k) f32`` their scores, descending.
      opponents: ``(n_targets, k) int64`` training rows with the most negative scores.
      opponent_scores: ``(n_targets, k) f32`` their scores, ascending.
    """

    proponents: np.ndarray
    proponent_scores: np.ndarray
    opponents: np.ndarray
    opponent_scores: np.ndarray


def fold_targets(inverse: jax.Array, targets: jax.Array) -> jax.Array:
    """T = A φᵀ ``(k, m) f32`` of ``inverse (k, k) f32`` and ``targets (m, k) f32``."""
    return jnp.matmul(inverse.astype(jnp.float32), targets.astype(jnp.float32).T,
                      precision=_HIGHEST)


@jax.jit
def row_weights(out_to_loss: jax.Array) -> jax.Array:
    """w = mean_m(Q_m) / M ``(c,) f32`` of ``out_to_loss (M, c)``: the per-row factor
    that turns Σ_m scores into mean_m(scores) · mean_m(Q)."""
    q = out_to_loss.astype(jnp.float32)
    return jnp.sum(q, axis=0) / jnp.float32(q.shape[0] ** 2)


def score_block(train: jax.Array, folded: jax.Array, weights: jax.Array) -> jax.Array:
    """``(c, m) f32`` block Σ_m train[m] @ folded[m], times ``weights`` per row.

    Args:
      train: ``(M, c, k) f32`` Φ_m rows of the M checkpoints.
      folded: ``(M, k, m) f32`` T_m = A_m φ_mᵀ (:func:`fold_targets`).
      weights: ``(c,) f32`` :func:`row_weights`.
    """
    s = jnp.einsum("ack,akt->ct", train.astype(jnp.float32), folded, precision=_HIGHEST)
    return s * weights[:, None]


def select_top(values: jax.Array, rows: jax.Array, k: int):
    """The ``k`` largest of each row of ``values (m, r)`` and their ``rows (m, r)``."""
    kk = min(k, values.shape[1])
    top, where = jax.lax.top_k(values, kk)
    return top, jnp.take_along_axis(rows, where, axis=1)


def topk_block(train, folded, weights, rows, n_valid, k: int):
    """Per target, the best ``k`` of a block of rows, as four ``(m, kk)`` arrays.

    Args as for :func:`score_block`, plus ``rows (c,) i32`` the block's row numbers and
    ``n_valid``: rows at or past it (padding) are ignored. Returns ``(hi, hi_rows, lo,
    lo_rows)``, ``lo`` holding negated scores; kk = min(k, c).
    """
    s = jnp.einsum("ack,akt->tc", train.astype(jnp.float32), folded,
                   precision=_HIGHEST) * weights[None, :]
    valid = rows[None, :] < n_valid
    kk = min(k, s.shape[1])
    hi, hi_i = jax.lax.top_k(jnp.where(valid, s, -jnp.inf), kk)
    lo, lo_i = jax.lax.top_k(jnp.where(valid, -s, -jnp.inf), kk)
    return hi, rows[hi_i], lo, rows[lo_i]


@jax.jit(static_argnames=("k",))
def merge_topk(running: tuple, block: tuple, k: int) -> tuple:
    """Merge two ``(hi, hi_rows, lo, lo_rows)`` states, each ``(m, ·)``, into the best k."""
    merged = [jnp.concatenate([a, b], axis=1) for a, b in zip(running, block)]
    return select_top(merged[0], merged[1], k) + select_top(merged[2], merged[3], k)
