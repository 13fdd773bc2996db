"""The demo report's ``index.html``: the pictures, what they show in words computed from
the numbers, and the tables (see :mod:`trax_attr.apps.report`)."""

from __future__ import annotations

import dataclasses
import html
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .report import Results

__all__ = ["page", "fmt", "LDS_PIXELS"]

LDS_PIXELS = (640, 400)  # size of the LDS, removal and scatter pictures


def fmt(result) -> str:
    """``mean [low, high]`` of an LDS result, three decimals."""
    return f"{result.mean:.3f} [{result.low:.3f}, {result.high:.3f}]"

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;line-height:1.45;color:#222;
 max-width:1100px;margin:1.5em auto;padding:0 1em}
img{max-width:100%;height:auto;border:1px solid #ddd;display:block;margin:.5em 0}
pre{background:#f6f6f6;padding:1em;white-space:pre-wrap;overflow-wrap:anywhere;font-size:13px}
code{overflow-wrap:anywhere}
table{border-collapse:collapse;margin:.5em 0 1em}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.figs{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:1.2em}
.figs figure{margin:0}
figcaption{font-size:14px;color:#444}
"""


def _lds_story(r: Results) -> str:
    """What the LDS table shows, in words computed from it."""
    sizes = sorted(r.lds["TRAK"])
    trak = [r.lds["TRAK"][size].mean for size in sizes]
    cosine = [r.lds["grad-cosine"][size].mean for size in sizes]
    parts = []
    if trak[0] < cosine[0]:
        parts.append(f"With one checkpoint TRAK ({trak[0]:.3f}) is below grad-cosine "
                     f"({cosine[0]:.3f}): a single model's TRAK estimate is noisy.")
    if len(sizes) > 1:
        rising = all(b > a for a, b in zip(trak, trak[1:]))
        parts.append(f"From M = 1 to M = {sizes[-1]} TRAK's LDS goes from {trak[0]:.3f} to "
                     f"{trak[-1]:.3f}{' (rising at every step)' if rising else ''}, "
                     f"grad-cosine's from {cosine[0]:.3f} to {cosine[-1]:.3f}.")
    return " ".join(parts)


def _per_target_removal(r: Results, rows: list[dict]) -> dict[int, float]:
    """{target: its mean margin drop when its top-k (largest k) proponents are removed}."""
    top = r.removal["top_drop"].mean(0)[-1]
    return {int(t): float(d) for t, d in zip(r.removal["targets"], top)}


def page(r: Results, rows: list[dict], targets: list[int], j: int, lines: list[str]) -> str:
    c, p = r.config, r.preds
    e = html.escape
    n, m = len(r.train[0]), len(r.test[0])
    top_m = max(r.lds["TRAK"])
    trak1, trakm = r.lds["TRAK"][1], r.lds["TRAK"][top_m]
    cosine, dot = r.lds["grad-cosine"][top_m], r.lds["grad-dot"][top_m]
    rnd = r.lds["random"][1]
    best = rows[-1]
    two = r.lds.get("TRAK, 2-seed mean")
    glance_two = seed_text = lds_two = ""
    if two is not None:
        mean, low, high, _ = r.seed_to_seed
        glance_two = (f"<tr><td>LDS of TRAK (M = {top_m}) against the mean of 2 retrainings per "
                      f"subset</td><td class=n>{two[top_m].mean:.3f}</td></tr>")
        lds_two = ("<tr><td>TRAK against the mean of 2 retrainings</td><td class=n colspan=3>"
                   + ", ".join(f"M = {size}: {two[size].mean:.3f}" for size in sorted(two))
                   + f"</td></tr><tr><td>one retraining as the prediction of another</td>"
                   f"<td class=n colspan=3>{mean:.3f} [{low:.3f}, {high:.3f}]</td></tr>")
        seed_text = f"""<p>How noisy is the ground truth? Every LDS subset is retrained from one
shared initialisation and minibatch order (a paired design: subsets differ by their data
alone), and a second time from another shared seed. Used as the prediction of the first, the
second retraining reaches a Spearman correlation of {mean:.3f} [{low:.3f}, {high:.3f}] with it{': which half of the training set a CNN sees moves a target&#39;s margin much less than the seed does, so any LDS measured against single retrainings is small' if mean < 0.2 else ''}.
Against the mean of the two retrainings, a less noisy ground truth, TRAK's LDS at M = {top_m} is
{two[top_m].mean:.3f} (against single retrainings: {trakm.mean:.3f}).</p>"""
    lds_rows = "".join(
        f"<tr><td>M = {size}</td><td class=n>{fmt(r.lds['TRAK'][size])}</td>"
        f"<td class=n>{fmt(r.lds['grad-cosine'][size])}</td>"
        f"<td class=n>{fmt(r.lds['grad-dot'][size])}</td></tr>"
        for size in sorted(r.lds["TRAK"]))
    removal_rows = "".join(
        f"<tr><td>k = {row['k']}</td><td class=n>{row['top_mean']:+.2f} ± {row['top_sd']:.2f}"
        f"</td><td class=n>{row['random_mean']:+.2f} ± {row['random_sd']:.2f}</td>"
        f"<td class=n>{row['above_random_p95']:.0%}</td></tr>" for row in rows)
    same_rows = "".join(f"<tr><td>{e(name)}{' (M = %d)' % top_m if name != 'random' else ''}"
                        f"</td><td class=n>{rate:.1%}</td></tr>"
                        for name, rate in r.same_class.items())
    lambda_rows = "".join(f"<tr><td>{i}</td><td class=n>{v:.4g}</td>"
                          f"<td class=n>{p['accuracy'][i]:.3f}</td></tr>"
                          for i, v in r.lambdas.items())
    drops = _per_target_removal(r, rows)
    target_rows = "".join(
        f"<tr><td>#{t}</td><td class=n>{r.test[1][t]}</td><td class=n>{p['predicted'][t]}</td>"
        f"<td class=n>{p['mean_margin'][t]:+.2f}</td><td class=n>"
        f"{'%+.2f' % drops[t] if t in drops else '–'}</td></tr>" for t in targets)
    wrong = [t for t in targets if p["predicted"][t] != r.test[1][t]]
    wrong_note = "".join(
        f" Target #{t} (label {r.test[1][t]}) is predicted {p['predicted'][t]} (red title)."
        for t in wrong)
    settings = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(c).items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>trax_attr demo: TRAK on digits</title><style>{_CSS}</style></head><body>
<h1>TRAK on scikit-learn digits with an ensemble of {c.checkpoints} Flax CNNs</h1>
<p>{n} training and {m} test digits. The CNNs reach a test accuracy of
<b>{p['ensemble_accuracy']:.1%}</b> as an ensemble ({p['accuracy'].mean():.1%} each on average).
TRAK (<code>proj_dim={c.proj_dim}</code>, <code>lambda_reg="auto"</code>) scores every training
image for every test image. The scores are then checked as in the TRAK paper, against CNNs
retrained without parts of the training set.</p>

<h2>At a glance</h2>
<table>
<tr><th>check</th><th>result</th></tr>
<tr><td>test accuracy: ensemble / mean of the checkpoints</td><td class=n>{p['ensemble_accuracy']:.3f} / {p['accuracy'].mean():.3f}</td></tr>
<tr><td>LDS of TRAK, M = 1 / M = {top_m} checkpoints</td><td class=n>{trak1.mean:.3f} / <b>{trakm.mean:.3f}</b></td></tr>
<tr><td>LDS of grad-cosine / grad-dot from the same {top_m} checkpoints</td><td class=n>{cosine.mean:.3f} / {dot.mean:.3f}</td></tr>
<tr><td>LDS of random scores</td><td class=n>{rnd.mean:.3f}</td></tr>
{glance_two}
<tr><td>margin drop after removing the top-{best['k']} proponents / {best['k']} random images</td>
<td class=n><b>{best['top_mean']:+.2f}</b> / {best['random_mean']:+.2f}</td></tr>
<tr><td>top-{c.k} proponents of the target's own class, all {m} targets</td>
<td class=n>{r.same_class['TRAK']:.1%} (chance {r.chance:.1%})</td></tr>
</table>

<h2>Counterfactual: remove the proponents, retrain</h2>
<p>For {len(r.removal['targets'])} test targets (those of the grid below, then others drawn at
random; none chosen by its scores), CNNs are retrained without the target's k strongest TRAK
proponents, and without k random training images. Each is compared with a CNN trained on all
{n} images with the same seed, and the drop of the target's margin is averaged over
{r.removal['top_drop'].shape[0]} seed(s). If the scores point at the examples the prediction
rests on, removing them lowers the margin far more than removing random images.</p>
<table><tr><th>removed</th><th>top-k proponents: drop (mean ± sd over targets)</th>
<th>k random: drop (mean ± sd)</th><th>targets whose drop exceeds the 95th percentile of random</th></tr>
{removal_rows}</table>
<img src="removal.png" alt="margin drop after removing top-k proponents against random removal" width="{LDS_PIXELS[0]}" height="{LDS_PIXELS[1]}">

<h2>Linear datamodeling score (LDS)</h2>
<p>The LDS asks: if the CNN is retrained on a random {c.alpha:.0%} of the training set, do the
scores predict how its margin on a target changes? For each target it is the Spearman
correlation, over {len(r.masks)} retrained subsets, between the sum of the scores of the subset's
examples and the retrained CNN's margin; the LDS is its mean over targets, and random scores
give 0. The gradient baselines use the same checkpoints and the same projected gradients as
TRAK, averaged over checkpoints as TRAK is: a like-for-like comparison. {_lds_story(r)}</p>
<table><tr><th>ensemble size</th><th>TRAK</th><th>grad-cosine</th><th>grad-dot</th></tr>
{lds_rows}<tr><td>random scores</td><td class=n colspan=3>{fmt(rnd)}</td></tr>
{lds_two}</table>
{seed_text}
<div class="figs">
<figure><img src="lds_vs_ensemble.png" alt="LDS against the number of checkpoints" width="{LDS_PIXELS[0]}" height="{LDS_PIXELS[1]}">
<figcaption>LDS (95% bootstrap interval over targets) against the number of checkpoints M.</figcaption></figure>
<figure><img src="lds_scatter.png" alt="predicted against actual margin changes for one target" width="{LDS_PIXELS[0]}" height="{LDS_PIXELS[1]}">
<figcaption>Target #{j}, the one with the median LDS: each point is one retrained subset, TRAK's
predicted margin change against the retrained CNN's. Open circles: the same subsets retrained
from another shared seed; the vertical gaps are seed noise.</figcaption></figure>
</div>

<h2>Proponents and opponents</h2>
<p>Each row is a test image (left: its label, the ensemble's prediction and its mean margin,
log p / (1 − p) of the label) and the training images that most raise (green) and most lower
(red) that margin, with their scores.{wrong_note} Proponents of another class are common for
confident targets: a training image scores high when the model still fits it badly (TRAK
weights each training example by 1 − p) and its gradient aligns with the target's. Whether
that is right is what the removal check measures: the last column is the target's own margin
drop when its top-{best['k']} proponents are removed.</p>
<img src="proponents.png" alt="proponents and opponents grid">
<table><tr><th>target</th><th>label</th><th>predicted</th><th>margin</th>
<th>drop, top-{best['k']} removed</th></tr>{target_rows}</table>
<p>Same-class rate: the fraction of the top-{c.k} proponents, over all {m} test targets, whose
label is the target's (chance {r.chance:.1%}). It measures plausibility, not correctness: the
LDS and the removal check measure whether the scores predict what retraining does.</p>
<table><tr><th>scores</th><th>same class</th></tr>{same_rows}</table>

<h2>Settings</h2>
<table><tr><th>checkpoint</th><th>λ chosen by "auto"</th><th>test accuracy</th></tr>{lambda_rows}</table>
<p>{e(settings)}.</p>
<p>Store: <code>{e(str(r.store_dir))}</code>. Explore it with <code>trax-attr info</code> and
<code>trax-attr top … --exp test --target {targets[0]}</code>.</p>
<h2>Printed summary</h2>
<pre>{e(chr(10).join(lines))}</pre>
</body></html>
"""
