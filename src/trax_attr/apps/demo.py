"""The `trax-attr demo`: TRAK on an ensemble of small Flax CNNs on scikit-learn's digits.

Trains (or reuses from a cache) ``checkpoints`` CNNs with BatchNorm, all in one compiled
program; attributes the test set with :class:`TRAKer`; checks the scores against
counterfactual retraining (LDS against ensemble size); and writes a report folder:

    proponents.png        targets with their strongest proponents and opponents
    lds_vs_ensemble.png   LDS (95% CI) against the number of checkpoints, with baselines
    index.html            both pictures and the printed summary
    summary.json          the numbers

Needs the ``demo`` extra (scikit-learn, matplotlib); the library itself does not. With
``torch=True`` (``trax-attr demo --torch``) it also scores the torch twin of the CNN
through ``interop`` (imported only then) and adds its agreement with the Flax scores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import json
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["DemoConfig", "QUICK", "CNN", "run_demo", "grid_pixels", "LDS_PIXELS"]

# Bumped when the recipe changes, so that older cached checkpoints are not reused.
_DEMO_VERSION = 1
_DPI = 100
LDS_PIXELS = (640, 400)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Settings of a demo run; :data:`QUICK` is the tiny one used by the tests."""

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
    lambda_rel: float = 0.1
    show: int = 6
    k: int = 5
    seed: int = 0


QUICK = DemoConfig(checkpoints=2, proj_dim=32, n_train=200, n_test=24, steps=100, subsets=6,
                   subset_steps=60, show=3, k=3)


def grid_pixels(show: int, k: int) -> tuple[int, int]:
    """(width, height) in pixels of proponents.png for ``show`` targets and top-``k``."""
    return int(round((2 * k + 1.5) * _DPI)), int(round((1.25 * show + 1.0) * _DPI))


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


def _digest(data) -> str:
    return hashlib.blake2b(json.dumps(data, sort_keys=True).encode(), digest_size=8).hexdigest()


def _checkpoints(config: DemoConfig, train, folder: Path, say: Callable[[str], None]):
    """The ensemble as nnx.State checkpoints, trained once and kept as orbax directories.

    Model i depends only on fold_in(key, i), so a larger ``checkpoints`` keeps the first ones.
    """
    from ..models.checkpoints import load_checkpoint_dir, save_checkpoint_dir
    from ..evaluation import train_nnx_models

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


def _lambda_reg(config, model, checkpoint, train, folder: Path) -> float:
    """λ = ``config.lambda_rel`` × the mean diagonal of XᵀX, from checkpoint 0.

    With φ = Pᵀg/√d, E φ_ij² = |g_i|²/d for every column j, so the mean diagonal of XᵀX is
    Σ_i |g_i|²/d whatever proj_dim is: it is read from unprojected features. Kept in the
    cache so that a rerun opens the store with the same λ. On digits, λ at 0.1 of the
    diagonal raised the LDS of 8 checkpoints at k = 512 from 0.11 (λ = 0) to 0.15.
    """
    from ..core import featurize

    path = folder / "lambda.json"
    if path.exists():
        return float(json.loads(path.read_text())["lambda_reg"])
    phi, _ = jax.jit(lambda ck, batch: featurize(model, ck, batch))(checkpoint, train)
    mean_diag = float(np.sum(np.square(np.asarray(phi, np.float64))))
    lambda_reg = float(f"{config.lambda_rel * mean_diag:.3g}")
    path.write_text(json.dumps({"lambda_reg": lambda_reg, "mean_diag": mean_diag}))
    return lambda_reg


def _run_trak(model, checkpoints, train, test, store_dir: Path, progress: bool, *,
              sizes: list[int] | None = None, **traker_kwargs):
    """Featurize and score (skipping work the store already holds) -> ({M: (n, m) f32}, traker,
    whether anything was computed). ``sizes`` picks the ensemble sizes M (default all)."""
    from ..traker import TRAKer

    traker = TRAKer(model=model, task="image_classification", train_set_size=len(train[0]),
                    save_dir=store_dir, progress=progress, **traker_kwargs)
    batch, n, m = 256, len(train[0]), len(test[0])
    worked = False
    for i, checkpoint in enumerate(checkpoints):
        meta = traker.store.model_meta(i)
        if meta is not None and meta.get("finalized"):
            continue
        worked = True
        traker.load_checkpoint(checkpoint, model_id=i)
        for s in range(0, n, batch):
            traker.featurize(batch=(train[0][s:s + batch], train[1][s:s + batch]),
                             num_samples=len(train[0][s:s + batch]))
    traker.finalize_features()
    for i, checkpoint in enumerate(checkpoints):
        if traker.targets_done("test", i):
            continue
        worked = True
        traker.start_scoring_checkpoint(exp_name="test", checkpoint=checkpoint, model_id=i,
                                        num_targets=m)
        for s in range(0, m, batch):
            traker.score(batch=(test[0][s:s + batch], test[1][s:s + batch]),
                         num_samples=len(test[0][s:s + batch]))
    scores = {size: traker.finalize_scores("test", model_ids=list(range(size)))
              for size in (sizes or [len(checkpoints)])}
    return scores, traker, worked


def _trak(config, train, test, graphdef, checkpoints, store_dir: Path, progress: bool,
          say) -> tuple[dict[int, np.ndarray], object, float]:
    """TRAK scores of the test set for M = 1, 2, 4, ... checkpoints -> {M: (n, m) f32}."""
    model = nnx.merge(graphdef, checkpoints[0])
    lambda_reg = _lambda_reg(config, model, checkpoints[0], train, store_dir.parent)
    sizes = sorted({min(2 ** p, len(checkpoints)) for p in range(len(checkpoints).bit_length())}
                   | {len(checkpoints)})
    start = time.perf_counter()
    scores, traker, worked = _run_trak(model, checkpoints, train, test, store_dir, progress,
                                       sizes=sizes, proj_dim=config.proj_dim, seed=config.seed,
                                       lambda_reg=lambda_reg)
    verb = "featurized and scored" if worked else "reused the TRAK store"
    say(f"TRAK: {verb} ({time.perf_counter() - start:.1f} s), proj_dim={config.proj_dim}, "
        f"lambda_reg={lambda_reg:g}, store {store_dir}")
    return scores, traker, lambda_reg


def _torch_twin(config, train, test, graphdef, checkpoints, flax_scores, lambda_reg,
                folder: Path, progress: bool, say) -> dict:
    """The same TRAK on the torch twin of the CNN (weights moved with flax_to_torch, the
    module converted to JAX by interop) and its agreement with the Flax scores.

    Two comparisons: (1) the demo's settings (proj_dim, seed) on every checkpoint. The
    projection assigns random rows to parameter entries in order, and torch orders and lays
    out the parameters differently (OIHW kernels, (out, in) weights), so this is another
    random matrix: agreement up to the projection's randomness. (2) the identity projector
    on checkpoint 0, where a permutation of the gradient's entries changes nothing: the
    scores must agree to float rounding.
    """
    from ..interop import compare
    from .demo_twin import torch_checkpoints

    start = time.perf_counter()
    module, state_dicts = torch_checkpoints(checkpoints)
    tag = f"k{config.proj_dim}-M{config.checkpoints}-l{config.lambda_rel:g}"
    scores, _, _ = _run_trak(module, state_dicts, train, test, folder / f"torch-trak-{tag}",
                             progress, backend="converted", proj_dim=config.proj_dim,
                             seed=config.seed, lambda_reg=lambda_reg)
    projected = compare(scores[config.checkpoints], flax_scores, k=config.k)
    exact = {}
    for name, model, ckpts in (("flax", nnx.merge(graphdef, checkpoints[0]), [None]),
                               ("torch", module, state_dicts[:1])):
        kwargs = {"backend": "converted"} if name == "torch" else {}
        exact[name] = _run_trak(model, ckpts, train, test,
                                folder / f"{name}-identity-l{config.lambda_rel:g}", progress,
                                projector="identity", lambda_reg=lambda_reg,
                                xtx_dtype=np.float64, **kwargs)[0][1]
    identity = compare(exact["torch"], exact["flax"], k=config.k)
    say(f"torch twin (interop, backend=\"converted\"): {time.perf_counter() - start:.1f} s")
    return {"projected": projected, "identity": identity}


def _grid_png(path: Path, config, train, test, targets, scores):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    k = config.k
    width, height = grid_pixels(len(targets), k)
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI)
    inches = height / _DPI
    grid = fig.add_gridspec(len(targets), 2 * k + 1, left=0.01, right=0.99,
                            top=1 - 0.7 / inches, bottom=0.02, wspace=0.15, hspace=0.55)
    fig.suptitle("TRAK: each target (left), its top proponents (green) and opponents (red),"
                 " with training index, label and score", fontsize=10, y=1 - 0.08 / inches)
    for row, j in enumerate(targets):
        order = np.argsort(-scores[:, j], kind="stable")
        cells = [(test[0][j], f"target #{j}\nlabel {test[1][j]}", "black")]
        cells += [(train[0][i], f"#{i} y={train[1][i]}\n{scores[i, j]:+.3g}", "tab:green")
                  for i in order[:k]]
        cells += [(train[0][i], f"#{i} y={train[1][i]}\n{scores[i, j]:+.3g}", "tab:red")
                  for i in order[::-1][:k]]
        for col, (image, title, color) in enumerate(cells):
            ax = fig.add_subplot(grid[row, col])
            ax.imshow(image[..., 0], cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(title, fontsize=7, color=color)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(2 if col else 1)
    fig.savefig(path, dpi=_DPI)


def _lds_png(path: Path, config, lds_by_size, baselines, n_targets):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(LDS_PIXELS[0] / _DPI, LDS_PIXELS[1] / _DPI), dpi=_DPI)
    ax = fig.add_subplot()
    sizes = sorted(lds_by_size)
    means = np.array([lds_by_size[s].mean for s in sizes])
    low = np.array([lds_by_size[s].low for s in sizes])
    high = np.array([lds_by_size[s].high for s in sizes])
    ax.errorbar(sizes, means, yerr=[means - low, high - means], marker="o", capsize=4,
                color="tab:blue", label="TRAK (95% CI)")
    styles = {"grad-cosine": "tab:orange", "grad-dot": "tab:green", "random": "tab:gray"}
    for name, result in baselines.items():
        ax.axhline(result.mean, ls="--", color=styles.get(name, "black"),
                   label=f"{name} (1 checkpoint)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("checkpoints in the ensemble (M)")
    ax.set_ylabel("LDS (Spearman)")
    ax.set_title(f"LDS on {n_targets} test targets, {config.subsets} retrained CNNs at "
                 f"alpha={config.alpha}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)


def _pick_targets(test, show: int) -> list[int]:
    """The first test example of distinct classes, for a varied grid."""
    picked, seen = [], set()
    for j, label in enumerate(test[1]):
        if int(label) not in seen:
            picked.append(j)
            seen.add(int(label))
        if len(picked) == show:
            break
    return picked


def run_demo(config: DemoConfig, out: str | Path, cache_dir: str | Path, *,
             progress: bool = True, say: Callable[[str], None] = print,
             torch: bool = False) -> dict:
    """Run the demo and write the report folder ``out``; returns the summary dict.

    ``torch=True`` also runs TRAK on the torch twin of the CNN through ``interop`` (which
    needs torch, imported only then) and reports its agreement with the Flax scores.
    """
    from ..evaluation import grad_cosine_scores, grad_dot_scores, lds, random_scores
    from ..evaluation import subset_retraining

    wall = time.perf_counter()
    out, cache_dir = Path(out), Path(cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, test = load_digits_split(config)
    recipe = {"version": _DEMO_VERSION, "seed": config.seed, "n_train": config.n_train,
              "n_test": config.n_test, "steps": config.steps, "lr": config.lr,
              "batch_size": config.batch_size}
    folder = cache_dir / f"demo-{_digest(recipe)}"
    say(f"digits: {len(train[0])} training and {len(test[0])} test images; cache {folder}")

    graphdef, checkpoints = _checkpoints(config, train, folder, say)
    accuracy = []
    for checkpoint in checkpoints:
        model = nnx.merge(graphdef, checkpoint)
        model.eval()
        accuracy.append(float((np.argmax(model(jnp.asarray(test[0])), -1) == test[1]).mean()))
    say(f"test accuracy of the checkpoints: {np.mean(accuracy):.3f} "
        f"(min {min(accuracy):.3f}, max {max(accuracy):.3f})")

    store_dir = folder / f"trak-k{config.proj_dim}-M{config.checkpoints}-l{config.lambda_rel:g}"
    scores_by_size, traker, lambda_reg = _trak(config, train, test, graphdef, checkpoints,
                                               store_dir, progress, say)
    scores = scores_by_size[config.checkpoints]
    twin = (_torch_twin(config, train, test, graphdef, checkpoints, scores, lambda_reg, folder,
                        progress, say) if torch else None)

    start = time.perf_counter()
    masks, margins = subset_retraining(
        jax.random.key(config.seed + 1), train, test, num_models=config.subsets,
        alpha=config.alpha, steps=config.subset_steps, lr=config.lr,
        batch_size=config.batch_size, make_model=CNN, models_at_once=1,
        cache_dir=folder / "counterfactual")
    say(f"counterfactuals: {config.subsets} CNNs retrained on random {config.alpha:.0%} "
        f"subsets ({time.perf_counter() - start:.1f} s, cached after the first run)")

    lds_by_size = {size: lds(s, masks, margins) for size, s in scores_by_size.items()}
    phi = traker.train_features(0)
    phi_t = traker.target_features("test", 0)
    baselines = {
        "grad-cosine": lds(grad_cosine_scores(phi, phi_t), masks, margins),
        "grad-dot": lds(grad_dot_scores(phi, phi_t), masks, margins),
        "random": lds(random_scores(jax.random.key(config.seed), *scores.shape), masks, margins),
    }

    targets = _pick_targets(test, config.show)
    _grid_png(out / "proponents.png", config, train, test, targets, scores)
    _lds_png(out / "lds_vs_ensemble.png", config, lds_by_size, baselines, len(test[0]))

    lines = ["LDS against ensemble size (mean [95% CI] over "
             f"{len(test[0])} test targets, {config.subsets} subsets):"]
    lines += [f"  M = {size:<3d} LDS = {r.mean:.3f} [{r.low:.3f}, {r.high:.3f}]"
              for size, r in sorted(lds_by_size.items())]
    lines += [f"  {name:<11s} LDS = {r.mean:.3f} [{r.low:.3f}, {r.high:.3f}]"
              for name, r in baselines.items()]
    for j in targets[:3]:
        order = np.argsort(-scores[:, j], kind="stable")
        pro = ", ".join(f"#{i} (y={train[1][i]}, {scores[i, j]:+.3g})" for i in order[:3])
        con = ", ".join(f"#{i} (y={train[1][i]}, {scores[i, j]:+.3g})" for i in order[::-1][:3])
        lines.append(f"target #{j} (label {test[1][j]}): proponents {pro}; opponents {con}")
    if twin is not None:
        lines += [f"torch twin vs Flax CNN, the demo's projector (proj_dim={config.proj_dim}, "
                  f"seed {config.seed}; torch's parameter layout meets another random matrix, "
                  f"so agreement is up to the projection's randomness), "
                  f"M = {config.checkpoints}:", *twin["projected"].table().splitlines(),
                  "torch twin vs Flax CNN, identity projector (checkpoint 0; layout-free, so "
                  "the same scores up to float rounding):", *twin["identity"].table().splitlines()]
    for line in lines:
        say(line)

    elapsed = time.perf_counter() - wall
    summary = {
        "config": dataclasses.asdict(config),
        "test_accuracy": accuracy,
        "lds": {str(size): r._asdict() | {"per_target": None}
                for size, r in sorted(lds_by_size.items())},
        "baselines": {name: r._asdict() | {"per_target": None} for name, r in baselines.items()},
        "targets": targets,
        "torch_twin": None if twin is None else {
            name: {row: {"min": float(np.nanmin(v)), "median": float(np.nanmedian(v)),
                         "max": float(np.nanmax(v))} for row, v, _ in agreement.rows()}
            for name, agreement in twin.items()},
        "store": str(store_dir),
        "seconds": elapsed,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _index_html(out / "index.html", config, lines, store_dir)
    say(f"report: {(out / 'index.html').resolve()}  ({elapsed:.1f} s)")
    say(f"explore: trax-attr info {store_dir}; trax-attr top {store_dir} --exp test "
        f"--target {targets[0]} -k 10")
    return summary


def _index_html(path: Path, config, lines, store_dir):
    settings = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(config).items())
    text = "\n".join(lines)
    path.write_text(f"""<!doctype html>
<html><head><meta charset="utf-8"><title>trax_attr demo</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}
img{{max-width:100%;border:1px solid #ddd}} pre{{background:#f6f6f6;padding:1em}}</style>
</head><body>
<h1>TRAK on scikit-learn digits with an ensemble of Flax CNNs</h1>
<p>Settings: {html.escape(settings)}. Store: <code>{html.escape(str(store_dir))}</code>.</p>
<h2>Proponents and opponents</h2>
<p>Each row is a test image (left) with the training images that most raise (green) and
most lower (red) the model's margin on it, with their TRAK scores.</p>
<img src="proponents.png" alt="proponents and opponents grid">
<h2>Linear datamodeling score against ensemble size</h2>
<p>How well the scores predict the margins of CNNs retrained on random halves of the
training set (Spearman correlation, mean over targets, 95% bootstrap interval); dashed
lines are baselines computed from one checkpoint's projected gradients.</p>
<img src="lds_vs_ensemble.png" alt="LDS against the number of checkpoints">
<h2>Summary</h2>
<pre>{html.escape(text)}</pre>
</body></html>
""")
