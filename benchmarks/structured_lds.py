"""LDS on digits: Kronecker-structured vs dense projection at equal k (linen MLP 64-64-10).

    PYTHONPATH=. python benchmarks/structured_lds.py   # JSON to benchmarks/results/
"""

from __future__ import annotations

import json
import os
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import trax_attr
from trax_attr.evaluation import lds, subset_retraining

N_TRAIN, N_TARGETS, CHECKPOINTS, SUBSETS = 500, 50, 3, 32


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.relu(nn.Dense(64)(x)))


def train(x, y, seed, steps=300):
    module = MLP()
    params = module.init(jax.random.key(seed), x[:1])["params"]
    opt = optax.adam(3e-3)
    state = opt.init(params)

    def loss(p):
        logits = module.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    for _ in range(steps):
        params, state = step(params, state)
    return {"params": params}


def scores_for(projector, checkpoints, train_set, targets):
    with tempfile.TemporaryDirectory() as tmp:
        traker = trax_attr.TRAKer(model=MLP(), task="image_classification",
                                  train_set_size=N_TRAIN, save_dir=tmp, projector=projector,
                                  lambda_reg=1e-4)
        for m, ckpt in enumerate(checkpoints):
            traker.load_checkpoint(ckpt, model_id=m)
            traker.featurize(train_set, num_samples=N_TRAIN)
        traker.finalize_features()
        for m, ckpt in enumerate(checkpoints):
            traker.start_scoring_checkpoint("t", ckpt, model_id=m, num_targets=N_TARGETS)
            traker.score(targets, num_samples=N_TARGETS)
        return np.asarray(traker.finalize_scores("t")), traker.proj_dim


def main():
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(x))
    x, y = x[perm], y[perm]
    train_set = (x[:N_TRAIN], y[:N_TRAIN])
    targets = (x[N_TRAIN:N_TRAIN + N_TARGETS], y[N_TRAIN:N_TRAIN + N_TARGETS])
    checkpoints = [train(jnp.asarray(train_set[0]), jnp.asarray(train_set[1]), s)
                   for s in range(CHECKPOINTS)]
    structured = trax_attr.kronecker(8, 8, fallback_dim=64)
    s_scores, k = scores_for(structured, checkpoints, train_set, targets)
    d_scores, _ = scores_for(trax_attr.rademacher(k, dtype=jnp.float32), checkpoints,
                             train_set, targets)
    masks, margins = subset_retraining(jax.random.key(1), train_set, targets,
                                       num_models=SUBSETS, hidden=(64,), steps=300)
    out = {"k": k, "n_train": N_TRAIN, "n_targets": N_TARGETS, "checkpoints": CHECKPOINTS,
           "subsets": SUBSETS}
    for name, sc in (("structured", s_scores), ("dense", d_scores)):
        r = lds(sc, masks, margins)
        out[name] = {"lds": float(r.mean), "low": float(r.low), "high": float(r.high)}
        print(f"{name:10} k={k}  LDS {r.mean:.3f}  [{r.low:.3f}, {r.high:.3f}]")
    path = os.path.join(os.path.dirname(__file__), "results", "structured_lds.json")
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
