"""The demo's report: four pictures, ``index.html`` and the summary it prints.

``write(out, results, say)`` makes, in ``out``:

    proponents.png        targets (label, prediction, margin) with their top proponents and opponents
    lds_vs_ensemble.png   LDS (95% CI) against M for TRAK and gradient baselines of the same M
    removal.png           margin drop after removing top-k proponents against k random examples
    lds_scatter.png       predicted against actual margins over the retrained subsets, one target
    index.html            the pictures, what they show, the numbers

Matplotlib (the ``demo`` extra) is imported only here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .report_html import LDS_PIXELS, fmt as _fmt, page

__all__ = ["Results", "write", "grid_pixels", "LDS_PIXELS", "PICTURES"]

_DPI = 100
PICTURES = ("proponents.png", "lds_vs_ensemble.png", "removal.png", "lds_scatter.png")
_COLORS = {"TRAK": "tab:blue", "grad-cosine": "tab:orange", "grad-dot": "tab:green",
           "random": "tab:gray"}


@dataclasses.dataclass(frozen=True)
class Results:
    """Everything the demo measured (see :func:`trax_attr.apps.demo.run_demo`)."""

    config: Any
    train: tuple
    test: tuple
    preds: dict
    scores: np.ndarray             # (n, m) TRAK scores of the whole ensemble
    masks: np.ndarray              # (S, n) bool, the LDS subsets
    margins: np.ndarray            # (S, m) margins of the CNNs retrained on them
    reference: np.ndarray | None   # (S, m) the same subsets retrained from another shared seed
    lds: dict                      # {method: {M: LDSResult}}
    seed_to_seed: tuple | None     # (mean, low, high, per_target) Spearman of two retrainings
    removal: dict
    same_class: dict
    chance: float
    lambdas: dict
    store_dir: Path
    twin: dict | None
    times: dict


def grid_pixels(show: int, k: int) -> tuple[int, int]:
    """(width, height) in pixels of proponents.png for ``show`` targets and top-``k``."""
    return int(round((2 * k + 1.5) * _DPI)), int(round((1.45 * show + 1.0) * _DPI))


def _figure(width: int, height: int):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI)


def pick_targets(test, show: int) -> list[int]:
    """The first test example of distinct classes, for a varied grid."""
    picked, seen = [], set()
    for j, label in enumerate(test[1]):
        if int(label) not in seen:
            picked.append(j)
            seen.add(int(label))
        if len(picked) == show:
            break
    return picked


def _grid_png(path: Path, r: Results, targets: list[int]) -> None:
    k = r.config.k
    width, height = grid_pixels(len(targets), k)
    fig = _figure(width, height)
    inches = height / _DPI
    grid = fig.add_gridspec(len(targets), 2 * k + 1, left=0.01, right=0.99,
                            top=1 - 0.75 / inches, bottom=0.02, wspace=0.15, hspace=0.9)
    fig.suptitle("Each target (left: label, the ensemble's prediction and mean margin), its top "
                 "proponents (green)\nand opponents (red), with training index, label and "
                 "TRAK score", fontsize=9, y=1 - 0.06 / inches)
    train_x, train_y = r.train
    for row, j in enumerate(targets):
        order = np.argsort(-r.scores[:, j], kind="stable")
        label, pred = int(r.test[1][j]), int(r.preds["predicted"][j])
        wrong = label != pred
        cells = [(r.test[0][j], f"target #{j}: label {label}\npred {pred}, margin "
                  f"{r.preds['mean_margin'][j]:+.2f}", "tab:red" if wrong else "black")]
        cells += [(train_x[i], f"#{i} y={train_y[i]}\n{r.scores[i, j]:+.3g}", "tab:green")
                  for i in order[:k]]
        cells += [(train_x[i], f"#{i} y={train_y[i]}\n{r.scores[i, j]:+.3g}", "tab:red")
                  for i in order[::-1][:k]]
        for col, (image, title, color) in enumerate(cells):
            ax = fig.add_subplot(grid[row, col])
            ax.imshow(image[..., 0], cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(title, fontsize=7, color=color,
                         fontweight="bold" if col == 0 and wrong else "normal")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(color if col else "black")
                spine.set_linewidth(2 if col else 1)
    fig.savefig(path, dpi=_DPI)


def _lds_png(path: Path, r: Results) -> None:
    fig = _figure(*LDS_PIXELS)
    ax = fig.add_subplot()
    sizes = sorted(r.lds["TRAK"])
    offsets = {"TRAK": 0.0, "grad-cosine": -0.04, "grad-dot": 0.04}
    for name in ("TRAK", "grad-cosine", "grad-dot"):
        by_size = r.lds[name]
        mean = np.array([by_size[s].mean for s in sizes])
        low = np.array([by_size[s].low for s in sizes])
        high = np.array([by_size[s].high for s in sizes])
        xs = np.array(sizes, float) * 2 ** offsets[name]
        ax.errorbar(xs, mean, yerr=[mean - low, high - mean], marker="o", capsize=3,
                    color=_COLORS[name], lw=2 if name == "TRAK" else 1.2,
                    label=f"{name} (95% CI)" if name == "TRAK" else f"{name}, same M")
    if "TRAK, 2-seed mean" in r.lds:
        by_size = r.lds["TRAK, 2-seed mean"]
        mean = np.array([by_size[s].mean for s in sizes])
        ax.plot(sizes, mean, ls="--", marker="o", mfc="white", color="tab:blue", lw=1.2,
                label="TRAK vs the mean of 2 retrainings per subset")
    rnd = r.lds["random"][1]
    ax.axhspan(rnd.low, rnd.high, color="tab:gray", alpha=0.25, label="random scores (95% CI)")
    if r.seed_to_seed is not None:
        mean, low, high, _ = r.seed_to_seed
        ax.axhline(mean, color="tab:purple", ls=":", lw=1.5,
                   label="one retraining as the prediction of another")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("checkpoints in the ensemble (M)")
    ax.set_ylabel("LDS (mean Spearman over targets)")
    ax.set_title(f"LDS on {len(r.test[0])} test targets, {len(r.masks)} CNNs retrained on "
                 f"random {r.config.alpha:.0%} subsets", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)


def _removal_summary(removal: dict) -> list[dict]:
    """Per k: the mean (over seeds) margin drop of each target for top-k removal, and of
    each (random set, target) pair for random removal, with their statistics."""
    rows = []
    top = removal["top_drop"].mean(0)          # (K, T)
    rand = removal["random_drop"].mean(0)      # (K, R, T)
    for ki, k in enumerate(removal["removed"]):
        random_values = rand[ki].reshape(-1)
        p95 = float(np.quantile(random_values, 0.95))
        rows.append({"k": int(k), "top": top[ki], "random": random_values,
                     "top_mean": float(top[ki].mean()), "top_sd": float(top[ki].std()),
                     "random_mean": float(random_values.mean()),
                     "random_sd": float(random_values.std()),
                     "random_p95": p95,
                     "above_random_p95": float((top[ki] > p95).mean())})
    return rows


def _removal_png(path: Path, r: Results, rows: list[dict]) -> None:
    fig = _figure(*LDS_PIXELS)
    ax = fig.add_subplot()
    rng = np.random.default_rng(0)
    for i, row in enumerate(rows):
        for offset, values, color, label in ((-0.18, row["top"], "tab:blue",
                                              "remove the target's top-k TRAK proponents"),
                                             (0.18, row["random"], "tab:gray",
                                              "remove k random training examples")):
            x = i + offset
            ax.boxplot([values], positions=[x], widths=0.28, showfliers=False,
                       medianprops={"color": color}, boxprops={"color": color},
                       whiskerprops={"color": color}, capprops={"color": color})
            ax.scatter(x + rng.uniform(-0.08, 0.08, len(values)), values, s=14, color=color,
                       alpha=0.7, zorder=3, label=label if i == 0 else None)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(rows)), [f"k = {row['k']}" for row in rows])
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylabel("target's margin drop (full − removed)")
    seeds = r.removal["top_drop"].shape[0]
    ax.set_title(f"Retrained without k training examples: {len(r.removal['targets'])} targets, "
                 f"mean of {seeds} seed(s) each", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)


def scatter_target(r: Results) -> int:
    """The target whose LDS is the median one of the whole ensemble (a typical target)."""
    per = r.lds["TRAK"][max(r.lds["TRAK"])].per_target
    valid = np.flatnonzero(np.isfinite(per))
    return int(valid[np.argsort(per[valid], kind="stable")[len(valid) // 2]])


def _scatter_png(path: Path, r: Results, j: int) -> None:
    fig = _figure(*LDS_PIXELS)
    ax = fig.add_subplot()
    # changes: each side less its mean over the subsets (Spearman does not see the shift)
    predicted = r.masks.astype(np.float64) @ r.scores[:, j].astype(np.float64)
    predicted -= predicted.mean()
    centre = r.margins[:, j].mean()
    actual = r.margins[:, j] - centre
    if r.reference is not None:
        other = r.reference[:, j] - centre
        ax.vlines(predicted, np.minimum(actual, other), np.maximum(actual, other),
                  color="tab:purple", alpha=0.35, lw=1)
        ax.scatter(predicted, other, s=18, facecolors="none", edgecolors="tab:purple",
                   alpha=0.8, label="the same subset retrained with another seed")
    ax.scatter(predicted, actual, s=20, color="tab:blue", label="CNN retrained on the subset")
    rho = r.lds["TRAK"][max(r.lds["TRAK"])].per_target[j]
    ax.set_xlabel("predicted margin change: sum of the subset's TRAK scores (centred)")
    ax.set_ylabel("actual margin change (centred)")
    ax.set_title(f"Target #{j} (label {r.test[1][j]}), {len(r.masks)} random subsets: Spearman "
                 f"{rho:.2f} (the median target)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)




def _lines(r: Results, rows: list[dict], targets: list[int]) -> list[str]:
    """The printed summary (also at the end of index.html)."""
    c, p = r.config, r.preds
    m = len(r.test[0])
    lines = [f"test accuracy: ensemble {p['ensemble_accuracy']:.3f}; checkpoints "
             + ", ".join(f"{a:.3f}" for a in p["accuracy"]),
             "lambda_reg='auto' chose λ per checkpoint: "
             + ", ".join(f"{i}: {v:.4g}" for i, v in r.lambdas.items()),
             f"LDS (mean [95% CI] over {m} targets, {len(r.masks)} subsets at "
             f"alpha={c.alpha}):"]
    for size in sorted(r.lds["TRAK"]):
        lines.append(f"  M = {size:<2d} TRAK {_fmt(r.lds['TRAK'][size])}   grad-cosine "
                     f"{_fmt(r.lds['grad-cosine'][size])}   grad-dot "
                     f"{_fmt(r.lds['grad-dot'][size])}")
    lines.append(f"  random scores {_fmt(r.lds['random'][1])}")
    if r.seed_to_seed is not None:
        mean, low, high, _ = r.seed_to_seed
        two = r.lds["TRAK, 2-seed mean"]
        lines.append("  TRAK against the mean of 2 retrainings per subset: "
                     + ", ".join(f"M = {size} {two[size].mean:.3f}" for size in sorted(two)))
        lines.append("  one retraining as the prediction of another (same subsets, another shared "
                     f"seed): "
                     f"Spearman {mean:.3f} [{low:.3f}, {high:.3f}]")
    seeds = r.removal["top_drop"].shape[0]
    lines.append(f"removal check ({len(r.removal['targets'])} targets, {seeds} seed(s), margin "
                 "drop = full − removed, mean ± sd over targets):")
    for row in rows:
        lines.append(f"  k = {row['k']:<3d} top-k proponents {row['top_mean']:+.3f} ± "
                     f"{row['top_sd']:.3f}   k random {row['random_mean']:+.3f} ± "
                     f"{row['random_sd']:.3f}   targets above the random 95th percentile "
                     f"{row['above_random_p95']:.0%}")
    lines.append(f"same-class rate of the top-{c.k} proponents over all {m} targets: "
                 + ", ".join(f"{name} {rate:.3f}" for name, rate in r.same_class.items())
                 + f" (chance {r.chance:.3f})")
    for j in targets:
        order = np.argsort(-r.scores[:, j], kind="stable")
        pro = ", ".join(f"#{i} (y={r.train[1][i]}, {r.scores[i, j]:+.3g})" for i in order[:3])
        lines.append(f"target #{j} (label {r.test[1][j]}, predicted {p['predicted'][j]}, "
                     f"margin {p['mean_margin'][j]:+.2f}): proponents {pro}")
    if r.twin is not None:
        lines += [f"torch twin vs Flax CNN, the demo's projector (proj_dim={c.proj_dim}, "
                  f"seed {c.seed}; torch's parameter layout meets another random matrix, so "
                  f"agreement is up to the projection's randomness), M = {c.checkpoints}:",
                  *r.twin["projected"].table().splitlines(),
                  "torch twin vs Flax CNN, identity projector (checkpoint 0; layout-free, so "
                  "the same scores up to float rounding):",
                  *r.twin["identity"].table().splitlines()]
    return lines


def write(out: Path, r: Results, say: Callable[[str], None]) -> dict:
    """Write the pictures and ``index.html`` into ``out``, print the summary with ``say``,
    and return the summary dict (JSON-able)."""
    targets = pick_targets(r.test, r.config.show)
    rows = _removal_summary(r.removal)
    j = scatter_target(r)
    _grid_png(out / "proponents.png", r, targets)
    _lds_png(out / "lds_vs_ensemble.png", r)
    _removal_png(out / "removal.png", r, rows)
    _scatter_png(out / "lds_scatter.png", r, j)
    lines = _lines(r, rows, targets)
    for line in lines:
        say(line)
    (out / "index.html").write_text(page(r, rows, targets, j, lines))

    def result(x):
        return {"mean": x.mean, "low": x.low, "high": x.high}

    return {
        "config": dataclasses.asdict(r.config),
        "test_accuracy": {"ensemble": r.preds["ensemble_accuracy"],
                          "checkpoints": [float(a) for a in r.preds["accuracy"]]},
        "lambdas": {str(i): v for i, v in r.lambdas.items()},
        "lds": {name: {str(size): result(x) for size, x in sorted(by_size.items())}
                for name, by_size in r.lds.items()},
        "seed_to_seed": None if r.seed_to_seed is None else dict(
            zip(("mean", "low", "high"), r.seed_to_seed[:3])),
        "removal": {"targets": [int(t) for t in r.removal["targets"]],
                    "seeds": int(r.removal["top_drop"].shape[0]),
                    "by_k": [{key: value for key, value in row.items()
                              if key not in ("top", "random")} for row in rows]},
        "same_class": r.same_class | {"chance": r.chance},
        "targets": targets,
        "predictions": {str(t): {"label": int(r.test[1][t]),
                                 "predicted": int(r.preds["predicted"][t]),
                                 "margin": float(r.preds["mean_margin"][t])} for t in targets},
        "scatter_target": j,
        "torch_twin": None if r.twin is None else {
            name: {row: {"min": float(np.nanmin(v)), "median": float(np.nanmedian(v)),
                         "max": float(np.nanmax(v))} for row, v, _ in agreement.rows()}
            for name, agreement in r.twin.items()},
        "store": str(r.store_dir),
        "stage_seconds": r.times,
    }
