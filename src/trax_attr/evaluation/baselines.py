"""Baselines an attribution method should beat: gradient dot product, cosine, random."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .lds import as_2d
from .retraining import check_key

__all__ = ["grad_dot_scores", "grad_cosine_scores", "random_scores"]


# --- baselines -------------------------------------------------------------------------

def _features_pair(train_features, target_features) -> tuple[np.ndarray, np.ndarray]:
    a = as_2d("train_features", train_features, np.float32)
    b = as_2d("target_features", target_features, np.float32)
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"train_features (n_train, k) has k = {a.shape[1]} but target_features has "
            f"k = {b.shape[1]}; featurize both with the same checkpoint and projector."
        )
    return a, b


def grad_dot_scores(train_features, target_features) -> np.ndarray:
    """Gradient dot product baseline: ``⟨g(z_i), g(z_j)⟩``.

    Args:
      train_features: ``(n_train, k)`` per-example (projected) gradients.
      target_features: ``(n_targets, k)`` the same for the targets.

    Returns:
      ``(n_train, n_targets) f32`` scores.
    """
    a, b = _features_pair(train_features, target_features)
    return (a.astype(np.float64) @ b.T.astype(np.float64)).astype(np.float32)


def grad_cosine_scores(train_features, target_features) -> np.ndarray:
    """Gradient cosine baseline: ``⟨g_i, g_j⟩ / (|g_i| |g_j|)``; zero gradients score 0.

    Args and returns as :func:`grad_dot_scores`.
    """
    a, b = _features_pair(train_features, target_features)
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    norm_a = np.linalg.norm(a, axis=1, keepdims=True)
    norm_b = np.linalg.norm(b, axis=1, keepdims=True)
    a = np.divide(a, norm_a, out=np.zeros_like(a), where=norm_a > 0)
    b = np.divide(b, norm_b, out=np.zeros_like(b), where=norm_b > 0)
    return (a @ b.T).astype(np.float32)


def random_scores(key, n_train: int, n_targets: int) -> np.ndarray:
    """Random baseline: i.i.d. N(0, 1) scores ``(n_train, n_targets) f32`` from ``key``."""
    key = check_key(key)
    return np.asarray(jax.random.normal(key, (int(n_train), int(n_targets)), jnp.float32))
