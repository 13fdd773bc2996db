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

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .counterfactual import bootstrap_mean, noise_reference, removal, same_class_rate
from .digits import CNN, DEMO_VERSION, QUICK, Bar, DemoConfig, load_digits_split

__all__ = ["DemoConfig", "QUICK", "CNN", "run_demo", "load_digits_split"]

_BATCH = 256  # rows per featurize / score call
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
    bar = Bar(progress, n * len(todo), f"TRAK featurize ({len(todo)} checkpoints)", "rows")
    for i in todo:
        traker.load_checkpoint(checkpoints[i], model_id=i)
        for s in range(0, n, _BATCH):
            part = (train[0][s:s + _BATCH], train[1][s:s + _BATCH])
            traker.featurize(batch=part, num_samples=len(part[0]))
            bar.update(len(part[0]))
    bar.close()
    traker.finalize_features()
    todo_scores = [i for i in range(len(checkpoints)) if not traker.targets_done("test", i)]
    bar = Bar(progress, m * len(todo_scores), f"TRAK score ({len(todo_scores)} checkpoints)",
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
    recipe = {"version": DEMO_VERSION, "seed": config.seed, "n_train": config.n_train,
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
        cache_dir=folder / "counterfactual", same_init=True)
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
        seed_to_seed = (*bootstrap_mean(per_target), per_target)
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
