"""TRAK for binary classification with ONE logit: digits 3 vs 8, a logistic regression.

Run: python examples/task_binary_classification.py   (under 10 s on 2 cores)

f = the signed logit, Q = 1 - sigmoid(f) (trax_attr.BinaryClassification). Prints for how many
targets the training examples of the same class score higher on average than the others.
"""

import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import trax_attr


def apply_fn(params, x):
    return x @ params["w"] + params["b"]          # (B,) logits of the class "8"


def main():
    data = load_digits()
    keep = np.isin(data.target, (3, 8))
    x = (data.data[keep] / 16).astype(np.float32)
    y = (data.target[keep] == 8).astype(np.int32)
    train_x, train_y, test_x, test_y = x[:250], y[:250], x[300:340], y[300:340]

    params = {"w": jnp.zeros(64), "b": jnp.zeros(())}
    loss = lambda p: optax.sigmoid_binary_cross_entropy(apply_fn(p, train_x),
                                                        train_y.astype(np.float32)).mean()
    step = jax.jit(lambda p: jax.tree.map(lambda a, g: a - 0.5 * g, p, jax.grad(loss)(p)))
    for _ in range(200):
        params = step(params)

    with tempfile.TemporaryDirectory() as save_dir:
        traker = trax_attr.TRAKer(model=apply_fn, task="binary_classification",
                                  train_set_size=len(train_x), save_dir=save_dir,
                                  projector="identity")
        traker.load_checkpoint(params, model_id=0)
        traker.featurize(batch=(train_x, train_y), num_samples=len(train_x))
        traker.finalize_features()
        traker.start_scoring_checkpoint(exp_name="test", checkpoint=params, model_id=0,
                                        num_targets=len(test_x))
        traker.score(batch=(test_x, test_y), num_samples=len(test_x))
        scores = traker.finalize_scores(exp_name="test")      # (250, 40)

    same = train_y[:, None] == test_y[None, :]                # (n_train, n_targets)
    gap = (scores * same).sum(0) / same.sum(0) - (scores * ~same).sum(0) / (~same).sum(0)
    agreement = float((gap > 0).mean())
    print(f"scores {scores.shape}; same-label training examples score higher on average "
          f"for {agreement:.0%} of targets")
    return agreement


if __name__ == "__main__":
    main()
