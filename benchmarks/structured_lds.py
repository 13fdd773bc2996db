"""LDS on digits: Kronecker-structured vs dense projection at equal k (linen MLP 64-64-10).

    PYTHONPATH=src python benchmarks/structured_lds.py   # JSON to benchmarks/results/
"""

from __future__ import annotations

import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import trax_attr
from _mlp import shuffled_digits, trak_scores, train
from trax_attr.evaluation import lds, subset_retraining

N_TRAIN, N_TARGETS, CHECKPOINTS, SUBSETS = 500, 50, 3, 32


def scores_for(projector, checkpoints, train_set, targets):
    with tempfile.TemporaryDirectory() as tmp:
        scores, traker = trak_scores(tmp, checkpoints, train_set, targets, projector=projector,
                                     lambda_reg=1e-4)
        return scores, traker.proj_dim


def main():
    x, y = shuffled_digits()
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
