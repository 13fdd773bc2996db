"""Scores from features: τ = mean_m(Φ_m A_m φ_m(z)ᵀ) · mean_m(Q_m), chunked over rows.

The pure functions here are the math of DESIGN.md; ``trak_scores`` is the whole
computation in one jittable call for data that fits in memory. The TRAKer's store path
streams the same products chunk by chunk over a mesh (``sharding.stream_scores``), so its
memory does not grow with n_train.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .features import solve, xtx

__all__ = ["score_block", "trak_scores"]


def score_block(features: jax.Array, targets: jax.Array) -> jax.Array:
    """``features (c, k)`` Φ·A rows times ``targets (m, k)`` φ -> ``(c, m)`` f32."""
    return jnp.matmul(features.astype(jnp.float32), targets.astype(jnp.float32).T,
                      precision=jax.lax.Precision.HIGHEST)


def trak_scores(train_features: jax.Array, out_to_loss: jax.Array, target_features: jax.Array,
                lambda_reg: float = 0.0, *, xtx_dtype=jnp.float32,
                traker_inverse_rescale: bool = False) -> jax.Array:
    """TRAK scores of an ensemble, all in memory; pure and jittable.

    Args:
      train_features: ``(M, n, k)`` f32 projected training gradients Φ_m.
      out_to_loss: ``(M, n)`` f32 out-to-loss terms Q_m of the training examples.
      target_features: ``(M, m, k)`` f32 projected target gradients φ_m.
      lambda_reg: λ added to each XᵀX.
      xtx_dtype: accumulation dtype of XᵀX.
      traker_inverse_rescale: divide each A_m by mean|A_m| as traker 0.3.2 does.

    Returns:
      ``(n, m)`` f32 scores τ.
    """
    def one(phi, targets):
        gram = xtx(phi, xtx_dtype)
        feats = solve(phi.astype(gram.dtype), gram, lambda_reg,
                      traker_inverse_rescale=traker_inverse_rescale)
        return score_block(feats, targets)

    per_model = jax.vmap(one)(train_features, target_features)
    return per_model.mean(0) * out_to_loss.mean(0)[:, None]
