"""The `trax-attr demo`: TRAK on an ensemble of small Flax CNNs on scikit-learn's digits.

Trains (or reuses from a cache) ``checkpoints`` CNNs with BatchNorm; attributes the test
set with :class:`TRAKer` (λ = "auto"); and checks the scores the two ways the TRAK paper
does, by retraining CNNs:

* the linear datamodeling score (LDS) against the ensemble size M, next to gradient
  baselines built from the same M checkpoints, and next to how well a second retraining of
  the same subsets predicts the first (the noise of the ground truth itself);
* the counterfactual: remove each target's top-k proponents, retrain, and compare the
  target's margin drop with removing k random training examples.

It writes a report folder (see :mod:`trax_attr.apps.report`): ``index.html``,
``proponents.png``, ``lds_vs_ensemble.png``, ``removal.png``, ``lds_scatter.png`` and
``summary.json``.

Needs the ``demo`` extra (scikit-learn, matplotlib); the library itself does not. With
``torch=True`` (``trax-attr demo --torch``) it also scores the torch twin of the CNN
through ``interop`` (imported only then) and adds its agreement with the Flax scores.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["DemoConfig", "QUICK", "CNN", "run_demo", "load_digits_split"]

# Bumped when the recipe changes, so that older cached checkpoints are not reused.
_DEMO_VERSION = 2
_BATCH = 256  # rows per featurize / score call


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


class _Bar:
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


# --- the ensemble --------------------------------------------------------------------

def _checkpoints(config: DemoConfig, train, folder: Path, say: Callable[[str], None]):
    """The ensemble as nnx.State checkpoints, trained once and kept as orbax directories.

    Model i depends only on fold_in(key, i), so a larger ``checkpoints`` keeps the first ones.
    """
    from ..evaluation import train_nnx_models
    from ..models.checkpoints import load_checkpoint_dir, save_checkpoint_dir

    paths = [folder / "checkpoints" / str(i) for i in range(config.checkpoints)]
    missing = [p for p in paths if not (p / "_CHECKPOINT_METADATA").exists()]
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: CNN(nnx.Rngs(0))))
    if missing:
        start = time.perf_counter()
        x, y = train
        rows = np.tile(np.arange(len(x), dtype=np.int32), (config.checkpoints, 1))
        graphdef, params, rest = train_nnx_models(
            jax.random.key(config.seed), CNN, x, y, rows, steps=config.steps, lr=config.lr,
            batch_size=config.batch_size, models_at_once=1)
        for i, path in enumerate(paths):
            one = lambda tree: jax.tree.map(lambda a: a[i], tree)  # noqa: E731, B023
            save_checkpoint_dir(path, nnx.merge_state(one(params), one(rest)))
        say(f"trained {config.checkpoints} CNNs ({config.steps} Adam steps each, "
            f"{time.perf_counter() - start:.1f} s)")
    else:
        say(f"reused {config.checkpoints} cached checkpoints from {paths[0].parent}")
    return graphdef, [load_checkpoint_dir(p, like=abstract) for p in paths]


def predictions(graphdef, checkpoints, test) -> dict:
    """What the ensemble says about the targets.

    Returns a dict of numpy arrays: ``accuracy (M,)`` of each checkpoint, ``logits
    (M, m, C)``, ``margins (M, m)`` (the attributed output, label margin), ``predicted
    (m,)`` (argmax of the mean softmax), ``mean_margin (m,)`` and ``ensemble_accuracy``.
    """
    from ..tasks import classification_margin

    x, y = jnp.asarray(test[0]), jnp.asarray(test[1])
    logits, margins = [], []
    for checkpoint in checkpoints:
        model = nnx.merge(graphdef, checkpoint)
        model.eval()
        out = model(x)
        logits.append(np.asarray(out))
        margins.append(np.asarray(jax.vmap(classification_margin)(out, y)))
    logits, margins = np.stack(logits), np.stack(margins)
    predicted = np.argmax(np.asarray(jax.nn.softmax(logits, -1)).mean(0), -1)
    return {"accuracy": (np.argmax(logits, -1) == test[1]).mean(1), "logits": logits,
            "margins": margins, "predicted": predicted, "mean_margin": margins.mean(0),
            "ensemble_accuracy": float((predicted == test[1]).mean())}


# --- TRAK ----------------------------------------------------------------------------

def ensemble_sizes(checkpoints: int) -> list[int]:
    """M = 1, 2, 4, ... and ``checkpoints`` itself."""
    return sorted({min(2 ** p, checkpoints) for p in range(checkpoints.bit_length())}
                  | {checkpoints})


def _run_trak(model, checkpoints, train, test, store_dir: Path, progress: bool, *,
              sizes: list[int] | None = None, **traker_kwargs):
    """Featurize and score (skipping work the store already holds) -> ({M: (n, m) f32}, traker,
    whether anything was computed). ``sizes`` picks the ensemble sizes M (default all)."""
    from ..traker import TRAKer

    traker = TRAKer(model=model, task="image_classification", train_set_size=len(train[0]),
                    save_dir=store_dir, progress=False, **traker_kwargs)
    n, m = len(train[0]), len(test[0])
    todo = [i for i in range(len(checkpoints)) if not traker.finalized(i)]
    bar = _Bar(progress, n * len(todo), f"TRAK featurize ({len(todo)} checkpoints)", "rows")
    for i in todo:
        traker.load_checkpoint(checkpoints[i], model_id=i)
        for s in range(0, n, _BATCH):
            part = (train[0][s:s + _BATCH], train[1][s:s + _BATCH])
            traker.featurize(batch=part, num_samples=len(part[0]))
            bar.update(len(part[0]))
    bar.close()
    traker.finalize_features()
    todo_scores = [i for i in range(len(checkpoints)) if not traker.targets_done("test", i)]
    bar = _Bar(progress, m * len(todo_scores), f"TRAK score ({len(todo_scores)} checkpoints)",
               "targets")
    for i in todo_scores:
        traker.start_scoring_checkpoint(exp_name="test", checkpoint=checkpoints[i],
                                        model_id=i, num_targets=m)
        for s in range(0, m, _BATCH):
            part = (test[0][s:s + _BATCH], test[1][s:s + _BATCH])
            traker.score(batch=part, num_samples=len(part[0]))
            bar.update(len(part[0]))
    bar.close()
    scores = {size: traker.finalize_scores("test", model_ids=list(range(size)))
              for size in (sizes or [len(checkpoints)])}
    return scores, traker, bool(todo or todo_scores)


def baselines(traker, sizes: Sequence[int], n_test: int, key) -> dict[str, dict[int, np.ndarray]]:
    """Gradient baselines from the same M checkpoints as TRAK: the mean over checkpoints
    of each checkpoint's grad-dot / grad-cosine of the stored projected gradients, plus
    random scores -> ``{name: {M: (n, m) f32}}``."""
    from ..evaluation import grad_cosine_scores, grad_dot_scores, random_scores

    per = {"grad-cosine": [], "grad-dot": []}
    for i in range(max(sizes)):
        phi, phi_t = traker.train_features(i), traker.target_features("test", i)
        per["grad-cosine"].append(grad_cosine_scores(phi, phi_t))
        per["grad-dot"].append(grad_dot_scores(phi, phi_t))
    out = {name: {size: np.mean(scores[:size], axis=0) for size in sizes}
           for name, scores in per.items()}
    out["random"] = {1: random_scores(key, traker.train_set_size, n_test)}
    return out


# --- retraining ----------------------------------------------------------------------

def _train_margins(keys, row_sets, train, targets, config: DemoConfig, bar: _Bar) -> np.ndarray:
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


def _cached(path: Path, compute: Callable[[], dict]) -> dict:
    from ..store.files import replace_file_atomic

    if path.exists():
        with np.load(path, allow_pickle=False) as cached:
            return {name: cached[name] for name in cached.files}
    arrays = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file_atomic(path, lambda handle: np.savez(handle, **arrays), binary=True)
    return arrays


def noise_reference(config: DemoConfig, masks, train, test, folder: Path,
                    progress: bool) -> np.ndarray:
    """Margins ``(S, m)`` of the LDS subsets retrained with other seeds (cached)."""
    from ..hashing import digest

    recipe = {"version": _DEMO_VERSION, "steps": config.subset_steps, "lr": config.lr,
              "batch_size": config.batch_size, "seed": config.seed}
    path = folder / f"noise-{digest(recipe, masks, train[1], test[1])[:16]}.npz"

    def compute():
        base = jax.random.key(config.seed + 7)
        keys = [jax.random.fold_in(base, i) for i in range(len(masks))]
        bar = _Bar(progress, len(masks), "retrain the LDS subsets, other seeds", "CNNs")
        margins = _train_margins(keys, [np.flatnonzero(mask) for mask in masks], train, test,
                                 config, bar)
        bar.close()
        return {"margins": margins}

    return _cached(path, compute)["margins"]


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
    recipe = {"version": _DEMO_VERSION, "steps": config.subset_steps, "lr": config.lr,
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
        bar = _Bar(progress, total, "retrain for the removal check", "CNNs")
        full = np.zeros((seeds, T), np.float32)
        top = np.zeros((seeds, K, T), np.float32)
        rand = np.zeros((seeds, K, R, T), np.float32)
        for s in range(seeds):
            key = jax.random.fold_in(jax.random.key(config.seed + 5), s)
            full[s] = _train_margins([key], [np.arange(n)], train, x_t, config, bar)[0]
            for ki in range(K):
                m_top = _train_margins([key] * T, [keep(d) for d in top_sets[ki]], train, x_t,
                                       config, bar)
                top[s, ki] = full[s] - np.diagonal(m_top)
                m_rand = _train_margins([key] * R, [keep(d) for d in random_sets[ki]], train,
                                        x_t, config, bar)
                rand[s, ki] = full[s][None] - m_rand
        bar.close()
        return {"full": full, "top_drop": top, "random_drop": rand}

    return {"targets": targets, "removed": removed, **_cached(path, compute)}


def same_class_rate(scores: np.ndarray, train_labels, target_labels, k: int) -> float:
    """Fraction of the top-``k`` proponents of all targets whose label is the target's."""
    top = np.argsort(-scores, axis=0, kind="stable")[:k]           # (k, m)
    return float((np.asarray(train_labels)[top] == np.asarray(target_labels)[None]).mean())


def _bootstrap_mean(values: np.ndarray, seed: int = 0, n: int = 1000) -> tuple[float, float, float]:
    values = values[np.isfinite(values)]
    means = np.random.default_rng(seed).choice(values, (n, len(values))).mean(1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(values.mean()), float(low), float(high)


# --- the demo ------------------------------------------------------------------------

def run_demo(config: DemoConfig, out: str | Path, cache_dir: str | Path, *,
             progress: bool | None = None, say: Callable[[str], None] = print,
             torch: bool = False) -> dict:
    """Run the demo and write the report folder ``out``; returns the summary dict.

    ``progress``: one tqdm bar per phase; None: only when stderr is a terminal.
    ``torch=True`` also runs TRAK on the torch twin of the CNN through ``interop`` (which
    needs torch, imported only then) and reports its agreement with the Flax scores.
    """
    from ..evaluation import lds, spearman_columns, subset_retraining
    from ..hashing import digest
    from . import report

    if progress is None:
        progress = sys.stderr.isatty()
    wall = time.perf_counter()
    out, cache_dir = Path(out), Path(cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, test = load_digits_split(config)
    recipe = {"version": _DEMO_VERSION, "seed": config.seed, "n_train": config.n_train,
              "n_test": config.n_test, "steps": config.steps, "lr": config.lr,
              "batch_size": config.batch_size}
    folder = cache_dir / f"demo-{digest(recipe)[:16]}"
    say(f"digits: {len(train[0])} training and {len(test[0])} test images; cache {folder}")
    times = {}

    start = time.perf_counter()
    graphdef, checkpoints = _checkpoints(config, train, folder, say)
    preds = predictions(graphdef, checkpoints, test)
    times["checkpoints"] = time.perf_counter() - start
    say(f"test accuracy: ensemble {preds['ensemble_accuracy']:.3f}; checkpoints "
        f"{preds['accuracy'].mean():.3f} on average (min {preds['accuracy'].min():.3f}, "
        f"max {preds['accuracy'].max():.3f})")

    start = time.perf_counter()
    sizes = ensemble_sizes(config.checkpoints)
    store_dir = folder / f"trak-k{config.proj_dim}-M{config.checkpoints}"
    scores_by_size, traker, worked = _run_trak(
        nnx.merge(graphdef, checkpoints[0]), checkpoints, train, test, store_dir, progress,
        sizes=sizes, proj_dim=config.proj_dim, seed=config.seed)
    lambdas = {i: float(v["value"]) for i, v in traker.lambdas().items()}
    scores = scores_by_size[config.checkpoints]
    times["trak"] = time.perf_counter() - start
    say(f"TRAK: {'featurized and scored' if worked else 'reused the TRAK store'} "
        f"({times['trak']:.1f} s), proj_dim={config.proj_dim}, lambda_reg='auto' chose λ = "
        + ", ".join(f"{v:.3g}" for v in lambdas.values()) + f"; store {store_dir}")
    twin = (_torch_twin(config, train, test, graphdef, checkpoints, scores, folder, progress,
                        say) if torch else None)

    start = time.perf_counter()
    say(f"retraining {config.subsets} CNNs on random {config.alpha:.0%} subsets for the LDS "
        "(cached after the first run) ...")
    masks, margins = subset_retraining(
        jax.random.key(config.seed + 1), train, test, num_models=config.subsets,
        alpha=config.alpha, steps=config.subset_steps, lr=config.lr,
        batch_size=config.batch_size, make_model=CNN, models_at_once=1,
        cache_dir=folder / "counterfactual")
    reference = (noise_reference(config, masks, train, test, folder, progress)
                 if config.noise_reference else None)
    times["lds retraining"] = time.perf_counter() - start

    base = baselines(traker, sizes, len(test[0]), jax.random.key(config.seed))
    lds_results = {"TRAK": {size: lds(s, masks, margins) for size, s in scores_by_size.items()}}
    for name, by_size in base.items():
        lds_results[name] = {size: lds(s, masks, margins) for size, s in by_size.items()}
    seed_to_seed = None
    if reference is not None:
        per_target = spearman_columns(margins, reference)
        seed_to_seed = (*_bootstrap_mean(per_target), per_target)
        mean_margins = (margins + reference) / 2
        lds_results["TRAK, 2-seed mean"] = {size: lds(s, masks, mean_margins)
                                            for size, s in scores_by_size.items()}

    start = time.perf_counter()
    say(f"removal check: {config.removal_targets} targets, removing k = "
        f"{', '.join(map(str, config.removed))}, {config.removal_seeds} seed(s) ...")
    removed = removal(config, scores, train, test, folder, progress,
                      first=report.pick_targets(test, config.show))
    times["removal retraining"] = time.perf_counter() - start

    top_m = config.checkpoints
    same_class = {"TRAK": same_class_rate(scores, train[1], test[1], config.k)}
    for name in ("grad-cosine", "grad-dot"):
        same_class[name] = same_class_rate(base[name][top_m], train[1], test[1], config.k)
    same_class["random"] = same_class_rate(base["random"][1], train[1], test[1], config.k)
    chance = float(np.mean([np.mean(train[1] == label) for label in test[1]]))

    results = report.Results(
        config=config, train=train, test=test, preds=preds, scores=scores, masks=masks,
        margins=margins, reference=reference, lds=lds_results, seed_to_seed=seed_to_seed,
        removal=removed, same_class=same_class, chance=chance, lambdas=lambdas,
        store_dir=store_dir, twin=twin, times=times)
    summary = report.write(out, results, say)
    summary["seconds"] = time.perf_counter() - wall
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    say(f"report: {(out / 'index.html').resolve()}  ({summary['seconds']:.1f} s)")
    say(f"explore: trax-attr info {store_dir}; trax-attr top {store_dir} --exp test "
        f"--target {summary['targets'][0]} -k 10")
    return summary


def _torch_twin(config, train, test, graphdef, checkpoints, flax_scores, folder: Path,
                progress: bool, say) -> dict:
    """The same TRAK on the torch twin of the CNN (weights moved with flax_to_torch, the
    module converted to JAX by interop) and its agreement with the Flax scores.

    Two comparisons: (1) the demo's settings (proj_dim, seed) on every checkpoint. The
    projection assigns random rows to parameter entries in order, and torch orders and lays
    out the parameters differently (OIHW kernels, (out, in) weights), so this is another
    random matrix: agreement up to the projection's randomness. (2) the identity projector
    on checkpoint 0, where a permutation of the gradient's entries changes nothing: the
    scores must agree to float rounding (λ = "auto" is the same on both sides, since the
    trace of XᵀX does not depend on the order of the features).
    """
    from ..interop import compare
    from .demo_twin import torch_checkpoints

    start = time.perf_counter()
    module, state_dicts = torch_checkpoints(checkpoints)
    tag = f"k{config.proj_dim}-M{config.checkpoints}"
    scores, _, _ = _run_trak(module, state_dicts, train, test, folder / f"torch-trak-{tag}",
                             progress, backend="converted", proj_dim=config.proj_dim,
                             seed=config.seed)
    projected = compare(scores[config.checkpoints], flax_scores, k=config.k)
    exact = {}
    for name, model, ckpts in (("flax", nnx.merge(graphdef, checkpoints[0]), [None]),
                               ("torch", module, state_dicts[:1])):
        kwargs = {"backend": "converted"} if name == "torch" else {}
        exact[name] = _run_trak(model, ckpts, train, test, folder / f"{name}-identity",
                                progress, projector="identity", xtx_dtype=np.float64,
                                **kwargs)[0][1]
    identity = compare(exact["torch"], exact["flax"], k=config.k)
    say(f"torch twin (interop, backend=\"converted\"): {time.perf_counter() - start:.1f} s")
    return {"projected": projected, "identity": identity}
