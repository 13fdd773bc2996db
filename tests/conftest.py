"""Shared fixtures: scikit-learn's digits (no download) and small models on them."""

import numpy as np
import pytest


@pytest.fixture(scope="session")
def digits():
    """(x (1797, 64) f32 in [0, 1], y (1797,) int32)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int32)


@pytest.fixture(scope="session")
def linear_checkpoints(digits):
    """Two linear softmax models trained briefly from different seeds: params dicts."""
    import jax
    import jax.numpy as jnp

    x, y = digits
    out = []
    for seed in (0, 1):
        key = jax.random.key(seed)
        params = {"w": 0.01 * jax.random.normal(key, (64, 10)), "b": jnp.zeros(10)}

        def loss(p):
            logits = x @ p["w"] + p["b"]
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])

        step = jax.jit(lambda p: jax.tree.map(lambda a, g: a - 0.5 * g, p, jax.grad(loss)(p)))
        for _ in range(20 + 10 * seed):
            params = step(params)
        out.append(jax.tree.map(np.asarray, params))
    return out


@pytest.fixture(scope="session")
def torchvision():
    """torchvision, importable next to a CPU-only torch 2.13 (skips without it).

    torchvision 0.28's compiled ops cannot load with torch 2.13.0+cpu; its models are pure
    Python, and defining the two operators its import expects is enough
    (tests/torchvision_ops.py). Test-only: the library never needs it.
    """
    pytest.importorskip("torch", reason="torchvision tests need torch")
    from torchvision_ops import define_torchvision_ops

    define_torchvision_ops()
    return pytest.importorskip("torchvision", reason="torchvision is not installed")
