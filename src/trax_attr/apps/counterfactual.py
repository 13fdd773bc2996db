"""The demo's retraining checks: margins of CNNs retrained on row subsets, the seed-noise
reference of the LDS and the counterfactual removal of top-k proponents (all cached on
disk by their recipe), the same-class rate and a bootstrap mean."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

from .digits import CNN, DEMO_VERSION, Bar, DemoConfig

__all__ = ["train_margins", "noise_reference", "removal", "same_class_rate", "bootstrap_mean"]


def train_margins(keys, row_sets, train, targets, config: DemoConfig, bar: Bar) -> np.ndarray:
    """Margins ``(len(keys), m) f32`` on ``targets`` of one CNN per (key, training rows),
    trained with the subset recipe (``subset_steps`` Adam steps)."""
    from ..evaluation import nnx_margins, train_nnx_models

    out = []
    for key, rows in zip(keys, row_sets):
        # one model per call: the same compiled program for every row set of any size
        graphdef, params, rest = train_nnx_models(
            key, CNN, train[0], train[1], np.asarray(rows, np.int32)[None],
            steps=config.subset_steps, lr=config.lr, batch_size=config.batch_size,
            models_at_once=1)
        out.append(nnx_margins(graphdef, params, rest, targets[0], targets[1])[0])
        bar.update()
    return np.stack(out).astype(np.float32)


def cached(path: Path, compute: Callable[[], dict]) -> dict:
    from ..store.writes import replace_file_atomic

    if path.exists():
        with np.load(path, allow_pickle=False) as cached:
            return {name: cached[name] for name in cached.files}
    arrays = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file_atomic(path, lambda handle: np.savez(handle, **arrays), binary=True)
    return arrays


def noise_reference(config: DemoConfig, masks, train, test, folder: Path,
                    progress: bool) -> np.ndarray:
    """Margins ``(S, m)`` of the LDS subsets retrained with another seed (cached), shared
    by every subset as in the LDS retraining itself (``same_init``)."""
    from ..hashing import digest

    recipe = {"version": DEMO_VERSION, "steps": config.subset_steps, "lr": config.lr,
              "batch_size": config.batch_size, "seed": config.seed, "same_init": True}
    path = folder / f"noise-{digest(recipe, masks, train[1], test[1])[:16]}.npz"

    def compute():
        base = jax.random.key(config.seed + 7)
        keys = [jax.random.fold_in(base, 0)] * len(masks)
        bar = Bar(progress, len(masks), "retrain the LDS subsets, another seed", "CNNs")
        margins = train_margins(keys, [np.flatnonzero(mask) for mask in masks], train, test,
                                 config, bar)
        bar.close()
        return {"margins": margins}

    return cached(path, compute)["margins"]


def removal(config: DemoConfig, scores: np.ndarray, train, test, folder: Path,
            progress: bool, first: Sequence[int] = ()) -> dict:
    """The counterfactual check: remove each target's top-k proponents, or k random
    training examples, retrain, and measure the target's margin drop (cached).

    For each seed s a full-data CNN and every removal CNN share their initialisation and
    minibatch key, so a drop is a paired difference (full − removed) of the same recipe.

    The targets are ``first`` (the grid's), then others drawn at random, none of them
    chosen by its scores. Returns a dict: ``targets (T,)``, ``removed (K,)``, ``full
    (seeds, T)`` margins,
    ``top_drop (seeds, K, T)`` and ``random_drop (seeds, K, R, T)``.
    """
    from ..hashing import digest

    n = len(train[0])
    rng = np.random.default_rng(config.seed + 3)
    count = min(config.removal_targets, len(test[0]))
    chosen = [int(j) for j in first][:count]
    others = rng.permutation(np.setdiff1d(np.arange(len(test[0])), chosen))
    targets = np.array(chosen + [int(j) for j in others[:count - len(chosen)]], np.int64)
    removed = np.array([k for k in config.removed if 0 < k < n], np.int64)
    random_sets = [[rng.permutation(n)[:k] for _ in range(config.random_removals)]
                   for k in removed]
    top_sets = [[np.argsort(-scores[:, j], kind="stable")[:k] for j in targets]
                for k in removed]
    x_t = (test[0][targets], test[1][targets])
    recipe = {"version": DEMO_VERSION, "steps": config.subset_steps, "lr": config.lr,
              "batch_size": config.batch_size, "seed": config.seed,
              "seeds": config.removal_seeds}
    path = folder / "removal" / (digest(recipe, targets, removed, *[a for sets in random_sets
                                                                    for a in sets],
                                        *[a for sets in top_sets for a in sets])[:16] + ".npz")

    def keep(drop):
        return np.setdiff1d(np.arange(n), drop)

    def compute():
        seeds = config.removal_seeds
        K, T, R = len(removed), len(targets), config.random_removals
        total = seeds * (1 + K * (T + R))
        bar = Bar(progress, total, "retrain for the removal check", "CNNs")
        full = np.zeros((seeds, T), np.float32)
        top = np.zeros((seeds, K, T), np.float32)
        rand = np.zeros((seeds, K, R, T), np.float32)
        for s in range(seeds):
            key = jax.random.fold_in(jax.random.key(config.seed + 5), s)
            full[s] = train_margins([key], [np.arange(n)], train, x_t, config, bar)[0]
            for ki in range(K):
                m_top = train_margins([key] * T, [keep(d) for d in top_sets[ki]], train, x_t,
                                       config, bar)
                top[s, ki] = full[s] - np.diagonal(m_top)
                m_rand = train_margins([key] * R, [keep(d) for d in random_sets[ki]], train,
                                        x_t, config, bar)
                rand[s, ki] = full[s][None] - m_rand
        bar.close()
        return {"full": full, "top_drop": top, "random_drop": rand}

    return {"targets": targets, "removed": removed, **cached(path, compute)}


def same_class_rate(scores: np.ndarray, train_labels, target_labels, k: int) -> float:
    """Fraction of the top-``k`` proponents of all targets whose label is the target's."""
    top = np.argsort(-scores, axis=0, kind="stable")[:k]           # (k, m)
    return float((np.asarray(train_labels)[top] == np.asarray(target_labels)[None]).mean())


def bootstrap_mean(values: np.ndarray, seed: int = 0, n: int = 1000) -> tuple[float, float, float]:
    values = values[np.isfinite(values)]
    means = np.random.default_rng(seed).choice(values, (n, len(values))).mean(1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(values.mean()), float(low), float(high)
