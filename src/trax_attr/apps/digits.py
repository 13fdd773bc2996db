"""The demo's setting: its configuration, scikit-learn's digits split, the nnx CNN and a
progress bar; shared by :mod:`trax_attr.apps.demo` and :mod:`trax_attr.apps.counterfactual`."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

__all__ = ["DemoConfig", "QUICK", "CNN", "load_digits_split", "Bar", "DEMO_VERSION"]

# Bumped when the recipe changes, so that older cached checkpoints are not reused.
DEMO_VERSION = 2


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Settings of a demo run; :data:`QUICK` is the tiny one used by the tests.

    Attributes:
      checkpoints: M, the CNNs in the ensemble (LDS is shown for M = 1, 2, 4, ..., M).
      proj_dim: k of the Rademacher projection.
      n_train, n_test: digits used for training and as targets (at most 1797 together).
      steps, lr, batch_size: Adam training of each checkpoint.
      subsets, subset_steps, alpha: the LDS ground truth: ``subsets`` CNNs trained for
        ``subset_steps`` steps on random ``alpha``-fractions of the training set.
      noise_reference: retrain the same subsets a second time with other seeds: shows how
        much of a retrained margin is seed noise, and gives the LDS against the mean of
        the two retrainings (doubles the LDS retraining time).
      removal_targets: test targets of the counterfactual check: the grid's targets, then
        targets drawn at random.
      removed: the k's of the counterfactual: top-k proponents removed, and k random.
      random_removals: random k-subsets removed per k (shared by all targets).
      removal_seeds: retraining seeds; each removal is compared with a full-data model
        of the same seed (same initialisation and minibatch order).
      show, k: targets in the proponents grid and proponents / opponents per target.
      seed: seed of the data split, the checkpoints, the projection and the retraining.
    """

    checkpoints: int = 8
    proj_dim: int = 512
    n_train: int = 1437
    n_test: int = 360
    steps: int = 500
    lr: float = 3e-3
    batch_size: int = 64
    subsets: int = 48
    subset_steps: int = 300
    alpha: float = 0.5
    noise_reference: bool = True
    removal_targets: int = 10
    removed: tuple[int, ...] = (20, 80)
    random_removals: int = 4
    removal_seeds: int = 2
    show: int = 6
    k: int = 5
    seed: int = 0


QUICK = DemoConfig(checkpoints=2, proj_dim=32, n_train=200, n_test=24, steps=100, subsets=6,
                   subset_steps=60, removal_targets=2, removed=(10,), random_removals=2,
                   removal_seeds=1, show=3, k=3)


def _pool(x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean((2, 4))


class CNN(nnx.Module):
    """Two 3x3 conv + BatchNorm + ReLU + 2x2 average-pool blocks and a linear head.

    Input ``(B, 8, 8, 1)`` f32 digits in [0, 1]; output ``(B, 10)`` logits. Train mode by
    default (batch statistics); ``.eval()`` uses the running averages.
    """

    def __init__(self, rngs: nnx.Rngs):
        # uniform fan-in init: the truncated normal default compiles slowly on CPU
        init = nnx.initializers.variance_scaling(2.0, "fan_in", "uniform")
        self.conv1 = nnx.Conv(1, 8, (3, 3), kernel_init=init, rngs=rngs)
        self.bn1 = nnx.BatchNorm(8, rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, (3, 3), kernel_init=init, rngs=rngs)
        self.bn2 = nnx.BatchNorm(16, rngs=rngs)
        self.head = nnx.Linear(16 * 2 * 2, 10, kernel_init=init, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = _pool(jax.nn.relu(self.bn1(self.conv1(x))))
        x = _pool(jax.nn.relu(self.bn2(self.conv2(x))))
        return self.head(x.reshape(x.shape[0], -1))


def load_digits_split(config: DemoConfig):
    """Shuffled digits: ``((x (n_train, 8, 8, 1) f32, y int32), (x_test, y_test))``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[..., None]
    y = data.target.astype(np.int32)
    order = np.random.default_rng(config.seed).permutation(len(x))
    x, y = x[order], y[order]
    if config.n_train + config.n_test > len(x):
        raise ValueError(f"n_train + n_test = {config.n_train + config.n_test} exceeds the "
                         f"{len(x)} digits.")
    train = (x[:config.n_train], y[:config.n_train])
    test = (x[config.n_train:config.n_train + config.n_test],
            y[config.n_train:config.n_train + config.n_test])
    return train, test


class Bar:
    """One tqdm bar for a whole phase (all checkpoints), or nothing."""

    def __init__(self, enabled: bool, total: int, desc: str, unit: str):
        self._bar = None
        if enabled and total > 0:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True,
                             leave=False)

    def update(self, count: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(count)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
