"""TRAK for image classification: a small MLP on scikit-learn's digits (no download).

Run: python examples/task_image_classification.py   (under 10 s on 2 cores)

Prints for how many test digits the training digits of the same class score higher on
average than the others: sensible attributions give close to 100%.
"""

import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import trax_attr


def apply_fn(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def train(x, y, seed, steps=300):
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {"w1": 0.1 * jax.random.normal(k1, (64, 32)), "b1": jnp.zeros(32),
              "w2": 0.1 * jax.random.normal(k2, (32, 10)), "b2": jnp.zeros(10)}
    opt = optax.adam(1e-2)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y).mean()
        updates, state = opt.update(jax.grad(loss)(params), state)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params


def main():
    data = load_digits()
    x, y = (data.data / 16).astype(np.float32), data.target.astype(np.int32)
    train_x, train_y, test_x, test_y = x[:1000], y[:1000], x[1500:1550], y[1500:1550]
    checkpoints = [train(train_x, train_y, seed) for seed in range(2)]

    with tempfile.TemporaryDirectory() as save_dir:
        traker = trax_attr.TRAKer(model=apply_fn, task="image_classification",
                                  train_set_size=len(train_x), save_dir=save_dir,
                                  proj_dim=512)
        for model_id, params in enumerate(checkpoints):
            traker.load_checkpoint(params, model_id=model_id)
            for start in range(0, len(train_x), 250):
                traker.featurize(batch=(train_x[start:start + 250], train_y[start:start + 250]),
                                 num_samples=250)
        traker.finalize_features()
        for model_id, params in enumerate(checkpoints):
            traker.start_scoring_checkpoint(exp_name="test", checkpoint=params,
                                            model_id=model_id, num_targets=len(test_x))
            traker.score(batch=(test_x, test_y), num_samples=len(test_x))
        scores = traker.finalize_scores(exp_name="test")      # (1000, 50)

    same = train_y[:, None] == test_y[None, :]                # (n_train, n_targets)
    gap = (scores * same).sum(0) / same.sum(0) - (scores * ~same).sum(0) / (~same).sum(0)
    agreement = float((gap > 0).mean())
    print(f"scores {scores.shape}; same-label training examples score higher on average "
          f"for {agreement:.0%} of targets")
    return agreement


if __name__ == "__main__":
    main()
