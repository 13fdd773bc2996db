"""What the digits benchmarks share: the linen MLP 64-h-10, its torch twin, training, and
one full TRAKer run. Not a benchmark itself (run_all.py lists the scripts). Only flax, jax
and numpy are imported up front, so end_to_end.py's traker child loads nothing more."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

# linen numbers submodules in construction order: the head, Dense(10), is built first
TORCH_NAMES = {"0": "Dense_1", "2": "Dense_0"}


class MLP(nn.Module):
    hidden: int = 64

    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.relu(nn.Dense(self.hidden)(x)))


def torch_twin(hidden: int = 64):
    """torch.nn.Sequential with the layout of MLP(hidden); load it with TORCH_NAMES."""
    import torch

    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, 10))


def shuffled_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits, x (1797, 64) f32 in [0, 1] and y int32, in a fixed order."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(x))
    return x[perm], y[perm]


def _adam():
    import optax

    return optax.adam(3e-3)


@jax.jit
def _step(params, state, x, y):
    """One full-batch adam(3e-3) step of MLP(); module-level, so every call of :func:`train`
    with the same shapes reuses one compiled program."""
    import optax

    def loss(p):
        logits = MLP().apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    updates, state = _adam().update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state


def train(x, y, seed: int, steps: int = 300) -> dict:
    """MLP() trained full-batch with adam(3e-3) from key(seed): ``{"params": ...}``."""
    params = MLP().init(jax.random.key(seed), x[:1])["params"]
    state = _adam().init(params)
    for _ in range(steps):
        params, state = _step(params, state, x, y)
    return {"params": params}


def trak_scores(save_dir, checkpoints, train_set, targets, **settings):
    """featurize + finalize + score every checkpoint with one TRAKer(model=MLP(), ...);
    ``(scores (n_train, n_targets), traker)``."""
    import trax_attr

    n, nt = len(train_set[0]), len(targets[0])
    traker = trax_attr.TRAKer(model=MLP(), task="image_classification", train_set_size=n,
                              save_dir=save_dir, **settings)
    for m, ckpt in enumerate(checkpoints):
        traker.load_checkpoint(ckpt, model_id=m)
        traker.featurize(train_set, num_samples=n)
    traker.finalize_features()
    for m, ckpt in enumerate(checkpoints):
        traker.start_scoring_checkpoint("t", ckpt, model_id=m, num_targets=nt)
        traker.score(targets, num_samples=nt)
    return np.asarray(traker.finalize_scores("t")), traker
