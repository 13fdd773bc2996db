"""Shared fixtures: scikit-learn's digits (no download) and small models on them.

The suite shares one JAX persistent compilation cache per run (a fresh temporary folder,
removed at the end; an existing JAX_COMPILATION_CACHE_DIR is kept): most tests compile the
same few programs from closures of their own, and the subprocess tests (launch, kill -9,
the demo, the benchmarks' smoke runs) compile them again in every process. A cache hit
gives the executable XLA would have built, so nothing a test asserts changes.
"""

import os
import shutil
import tempfile

import numpy as np
import pytest

_CACHE_VARS = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
               "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def pytest_configure(config):
    """Before any test module imports JAX: set the cache for this process, the pytest-xdist
    workers (they inherit the environment) and every subprocess a test starts."""
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="trax-attr-jax-cache-")
        config._trax_attr_jax_cache = os.environ["JAX_COMPILATION_CACHE_DIR"]
    for name, value in _CACHE_VARS.items():
        os.environ.setdefault(name, value)


def pytest_unconfigure(config):
    folder = getattr(config, "_trax_attr_jax_cache", None)
    if folder and "PYTEST_XDIST_WORKER" not in os.environ:
        shutil.rmtree(folder, ignore_errors=True)


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
