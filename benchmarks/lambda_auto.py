"""LDS of ``lambda_reg="auto"`` against the best fixed λ of a grid and λ = 0.

Settings of other models, data and regimes (the digits MLP, also at n = 500 and 1500 and
with under-fit checkpoints; the demo's CNN; attention on token sequences; a one-logit
binary MLP), each with k < n and k > n, M = 1 and M > 1. Features: ``trax_attr.featurize``
(rademacher, float32); ground truth: retraining on random halves (cached); LDS with 95% CIs:
``trax_attr.evaluation.lds``. "auto" is ``trax_attr.resolve_lambda("auto", XᵀX_m, n)`` per
checkpoint (float32 ``trax_attr.xtx``, as finalize holds it); "best" the best absolute λ of
a quarter-decade grid 1e-3 … 1e5 shared by the checkpoints; λ = 0 the pseudo-inverse.

Every λ is scored from ONE float64 eigendecomposition per checkpoint, not the library's
Cholesky per λ: Φ(ΦᵀΦ + λI)⁻¹ = (K + λI)⁻¹Φ with K = ΦΦᵀ, so with the eigenvectors of the
smaller of ΦᵀΦ and K, τ(λ) = L diag(1/(s + λ)) Rᵀ (λ = 0: eigenvalues under
s_max · max(n, k) · eps dropped). One row is cross-checked against the library's own
``trax_attr.trak_scores(..., lambda_reg="auto")``. Goal: auto ≥ 0.9 × best and ≥ λ = 0 in
every row. Time auto adds to finalize: ``resolve_lambda("auto")`` beside ``inverse_gram``.

    PYTHONPATH=src python benchmarks/lambda_auto.py [--quick] [--only NAME ...] [--cache DIR]

Writes benchmarks/results/lambda_auto.json (lambda_auto_quick.json) and prints a table.
``--quick`` is a smoke test of the code path (16 retrained models: CIs ±0.1), not a check.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import timeit
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import trax_attr
from _mlp import MLP, shuffled_digits, train as train_mlp
from trax_attr.apps.demo import CNN
from trax_attr.evaluation import lds, subset_retraining, train_nnx_models

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / ".cache" / "lambda_auto"


class Setting(NamedTuple):
    task: str
    model: object          # what trax_attr.featurize accepts
    checkpoints: list      # M of them
    train: tuple           # (x (n, ...) f32, y (n,) int32)
    targets: tuple         # (x (n_t, ...) f32, y (n_t,) int32)
    masks: np.ndarray      # (S, n) bool, the retrained subsets
    margins: np.ndarray    # (S, n_t) f32, their margins on the targets


def _split(x, y, n, nt):
    """The first n rows to train on; targets from the held-out end."""
    return (x[:n], y[:n]), (x[len(x) - nt:], y[len(x) - nt:])


# --- the settings -------------------------------------------------------------------------

def digits_mlp(cfg, cache):
    """digits; linen MLP 64-64-10 (d=4810) of benchmarks/_mlp.py, full-batch Adam; ground
    truth: subset_retraining's MLP 64-64-10 (minibatch Adam) on random halves"""
    train, targets = _split(*shuffled_digits(), cfg["n"], cfg["targets"])
    masks, margins = subset_retraining(jax.random.key(1), train, targets,
                                       num_models=cfg["subsets"], alpha=0.5, hidden=(64,),
                                       steps=cfg["steps"], cache_dir=cache)
    steps = cfg.get("checkpoint_steps", cfg["steps"])  # fewer: early, under-fit checkpoints
    x, y = jnp.asarray(train[0]), jnp.asarray(train[1])
    ckpts = [train_mlp(x, y, seed, steps) for seed in range(max(cfg["ensembles"]))]
    return Setting("image_classification", MLP(), ckpts, train, targets, masks, margins)


def _nnx_setting(make_model, train, targets, cfg, cache, models_at_once):
    """Checkpoints and retrained models both by trax_attr.evaluation.train_nnx_models."""
    masks, margins = subset_retraining(jax.random.key(1), train, targets,
                                       num_models=cfg["subsets"], alpha=0.5,
                                       steps=cfg["subset_steps"], lr=3e-3,
                                       batch_size=cfg["batch_size"], make_model=make_model,
                                       models_at_once=models_at_once, cache_dir=cache)
    count = max(cfg["ensembles"])
    rows = np.tile(np.arange(len(train[0]), dtype=np.int32), (count, 1))
    graphdef, params, rest = train_nnx_models(jax.random.key(0), make_model, *train, rows,
                                              steps=cfg["steps"], lr=3e-3,
                                              batch_size=cfg["batch_size"],
                                              models_at_once=models_at_once)
    take = lambda tree, i: jax.tree.map(lambda a: a[i], tree)  # noqa: E731
    states = [nnx.merge_state(take(params, i), take(rest, i)) for i in range(count)]
    return Setting("image_classification", nnx.merge(graphdef, states[0]), states, train,
                   targets, masks, margins)


def demo_cnn(cfg, cache):
    """digits 8x8x1; trax_attr.apps.demo.CNN with BatchNorm (d=1946), minibatch Adam;
    ground truth: the same CNN retrained on random halves"""
    x, y = shuffled_digits()
    train, targets = _split(x.reshape(-1, 8, 8, 1), y, cfg["n"], cfg["targets"])
    return _nnx_setting(CNN, train, targets, cfg, cache, models_at_once=1)


VOCAB, LENGTH, CLASSES, DIM = 40, 16, 4, 16


def token_data(count: int, seed: int):
    """``(tokens (count, LENGTH) f32, labels (count,) int32)``: tokens 0..19 mark class
    t // 5 (each position with probability 0.3), the rest are filler; the label is the class
    with most markers (ties: the earliest), then 10% resampled. Float ids: see TokenAttention."""
    rng = np.random.default_rng(seed)
    is_marker = rng.random((count, LENGTH)) < 0.3
    tokens = np.where(is_marker, rng.integers(0, 20, (count, LENGTH)),
                      rng.integers(20, VOCAB, (count, LENGTH)))
    hits = [(tokens // 5 == c) & (tokens < 20) for c in range(CLASSES)]
    counts = np.stack([h.sum(1) for h in hits], 1)
    first = np.stack([np.where(h.any(1), h.argmax(1), LENGTH) for h in hits], 1)
    label = np.where(counts == counts.max(1, keepdims=True), first, LENGTH + 1).argmin(1)
    noisy = rng.random(count) < 0.1
    label = np.where(noisy, rng.integers(0, CLASSES, count), label).astype(np.int32)
    return tokens.astype(np.float32), label


class TokenAttention(nnx.Module):
    """Embedding + learned positions, one single-head self-attention block (residual),
    mean-pool, MLP head: ``(B, LENGTH)`` token ids -> ``(B, CLASSES)`` logits. The ids come
    as float32 (subset_retraining's input type) and are cast here."""

    def __init__(self, rngs: nnx.Rngs):
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "uniform")
        self.embed = nnx.Embed(VOCAB, DIM, embedding_init=nnx.initializers.normal(0.5),
                               rngs=rngs)
        self.pos = nnx.Param(0.1 * jax.random.normal(rngs.params(), (LENGTH, DIM)))
        self.qkv = nnx.Linear(DIM, 3 * DIM, kernel_init=init, rngs=rngs)
        self.hidden = nnx.Linear(DIM, 32, kernel_init=init, rngs=rngs)
        self.head = nnx.Linear(32, CLASSES, kernel_init=init, rngs=rngs)

    def __call__(self, x):
        h = self.embed(x.astype(jnp.int32)) + self.pos[...]
        q, k, v = jnp.split(self.qkv(h), 3, axis=-1)
        att = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / math.sqrt(DIM), axis=-1)
        return self.head(jax.nn.relu(self.hidden((h + att @ v).mean(1))))


def token_attention(cfg, cache):
    """synthetic token sequences (token_data: V=40, T=16, 4 classes, 10% label noise);
    TokenAttention: embedding + 1 self-attention layer + MLP head (d=2388), minibatch Adam;
    ground truth: the same model retrained on random halves"""
    train, targets = token_data(cfg["n"], 0), token_data(cfg["targets"], 1)
    return _nnx_setting(TokenAttention, train, targets, cfg, cache,
                        models_at_once=cfg.get("models_at_once"))


class BinaryMLP(nnx.Module):
    """One-logit MLP 64-32-1: ``(B, 64) -> (B,)`` logits g, task binary_classification.
    With ``pair`` (while training) it returns ``(B, 2)`` logits [0, g] instead: their softmax
    cross-entropy is the logistic loss of g and their margin is ±g, so the library's
    retrainer and its margins serve the one-logit model as they are."""

    def __init__(self, rngs: nnx.Rngs, pair: bool = True):
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "uniform")
        self.hidden = nnx.Linear(64, 32, kernel_init=init, rngs=rngs)
        self.out = nnx.Linear(32, 1, kernel_init=init, rngs=rngs)
        self.pair = pair

    def __call__(self, x):
        g = self.out(jax.nn.relu(self.hidden(x)))[:, 0]
        return jnp.stack([jnp.zeros_like(g), g], axis=-1) if self.pair else g


def binary_digits(cfg, cache):
    """digits even (0) vs odd (1); one-logit MLP 64-32-1 (d=2113), task
    binary_classification, minibatch Adam; ground truth: the same MLP retrained on random
    halves"""
    x, y = shuffled_digits()
    train, targets = _split(x, (y % 2).astype(np.int32), cfg["n"], cfg["targets"])
    setting = _nnx_setting(BinaryMLP, train, targets, cfg, cache,
                           models_at_once=cfg.get("models_at_once"))
    setting.model.pair = False  # featurize the one logit itself
    return setting._replace(task="binary_classification")


FULL = {
    "digits_mlp": (digits_mlp, dict(n=1000, targets=200, subsets=256, steps=300,
                                    proj_dims=(512, 2048), ensembles=(1, 10))),
    "digits_mlp_n500": (digits_mlp, dict(n=500, targets=200, subsets=256, steps=300,
                                         proj_dims=(128, 2048), ensembles=(1, 10))),
    "digits_mlp_n1500": (digits_mlp, dict(n=1500, targets=200, subsets=256, steps=300,
                                          proj_dims=(128, 1024), ensembles=(1, 10))),
    "digits_mlp_early": (digits_mlp, dict(n=1000, targets=200, subsets=256, steps=300,
                                          checkpoint_steps=30, proj_dims=(512, 2048),
                                          ensembles=(1, 10))),
    "demo_cnn": (demo_cnn, dict(n=1000, targets=200, subsets=128, steps=500, subset_steps=300,
                                batch_size=64, proj_dims=(256, 2048), ensembles=(1, 5))),
    "token_attention": (token_attention, dict(n=1000, targets=200, subsets=256, steps=600,
                                              subset_steps=600, batch_size=128,
                                              proj_dims=(256, 2048), ensembles=(1, 5))),
    "binary_digits": (binary_digits, dict(n=1200, targets=200, subsets=256, steps=400,
                                          subset_steps=400, batch_size=128,
                                          proj_dims=(256, 2048), ensembles=(1, 5))),
}
# tiny versions, a smoke test (not a validation: LDS CIs ±0.1). The nnx models' training
# programs take 10-25 s each to compile on 2 cores, so they are left out here.
QUICK = {
    "digits_mlp": (digits_mlp, dict(n=200, targets=30, subsets=16, steps=100,
                                    proj_dims=(32, 256), ensembles=(1, 2))),
    "binary_digits": (binary_digits, dict(n=200, targets=30, subsets=16, steps=150,
                                          subset_steps=150, batch_size=64, models_at_once=2,
                                          proj_dims=(32, 256), ensembles=(1, 2))),
}


# --- features, spectra, scores --------------------------------------------------------------

def featurize_all(s: Setting, k: int):
    """``(phi (M, n, k), q (M, n), phi_t (M, n_t, k))`` f32 from trax_attr.featurize, train
    and targets in one batch (one compile per model and k)."""
    projector = trax_attr.rademacher(k, dtype=jnp.float32)
    fn = jax.jit(lambda ckpt, x, y, m: trax_attr.featurize(
        s.model, ckpt, (x, y), task=s.task, projector=projector, model_id=m))
    n = len(s.train[0])
    x, y = (jnp.asarray(np.concatenate([a, b])) for a, b in zip(s.train, s.targets))
    phi, q = zip(*(fn(c, x, y, m) for m, c in enumerate(s.checkpoints)))
    phi, q = np.stack(phi), np.stack(q)
    return phi[:, :n], q[:, :n], phi[:, n:]


def spectrum(phi, phi_t):
    """``(left (n, r), right (n_t, r), s (r,))`` f64 with Φ(ΦᵀΦ + λI)⁻¹φ_tᵀ =
    left · diag(1/(s + λ)) · rightᵀ for every λ, from one eigh of the smaller Gram matrix."""
    x, t = phi.astype(np.float64), phi_t.astype(np.float64)
    if x.shape[1] <= x.shape[0]:
        s, v = np.linalg.eigh(x.T @ x)              # ΦᵀΦ = V diag(s) Vᵀ
        return x @ v, t @ v, np.clip(s, 0, None)
    s, u = np.linalg.eigh(x @ x.T)                  # K = U diag(s) Uᵀ; (K + λI)⁻¹ Φ φ_tᵀ
    return u, (t @ x.T) @ u, np.clip(s, 0, None)


def scores(spectra, lambdas, q, n, k):
    """τ ``(n, n_t)`` f64 of the first len(lambdas) checkpoints, λ_m = lambdas[m] (0: the
    pseudo-inverse): mean_m(Φ_m A_m φ_mᵀ) · mean_m(Q_m)."""
    out = 0.0
    for (left, right, s), lam in zip(spectra, lambdas):
        if lam > 0:
            w = 1.0 / (s + lam)
        else:
            keep = s > s.max() * max(n, k) * np.finfo(np.float64).eps
            w = np.where(keep, 1.0 / np.where(keep, s, 1.0), 0.0)
        out = out + (left * w) @ right.T
    return out / len(lambdas) * q[:len(lambdas)].mean(0)[:, None]


def _point(r, lam=None):
    out = {"lds": r.mean, "low": r.low, "high": r.high}
    return out if lam is None else {"lambda": lam, **out}


def evaluate(name, s: Setting, cfg, grid, check_library):
    """Rows (one per k and M), and the library cross-check of the first k when asked."""
    rows, check = [], None
    n = len(s.train[0])
    for k in cfg["proj_dims"]:
        phi, q, phi_t = featurize_all(s, k)
        grams = [np.asarray(trax_attr.xtx(jnp.asarray(p))) for p in phi]  # f32, as finalize
        auto = [trax_attr.resolve_lambda("auto", g, n) for g in grams]
        # the time auto adds to finalize, beside the inverse finalize computes anyway
        t_auto = min(timeit.repeat(lambda: trax_attr.resolve_lambda("auto", grams[0], n),
                                   number=10, repeat=5)) / 10
        t_inverse = min(timeit.repeat(lambda: trax_attr.inverse_gram(grams[0], auto[0]),
                                      number=1, repeat=3))
        spectra = [spectrum(a, b) for a, b in zip(phi, phi_t)]
        for big_m in cfg["ensembles"]:
            def score(lambdas):
                return lds(scores(spectra[:big_m], lambdas, q, n, k), s.masks, s.margins)

            res = {float(lam): score([lam] * big_m) for lam in grid}
            best = max(res, key=lambda lam: res[lam].mean)
            got, zero = score(auto[:big_m]), score([0.0] * big_m)
            row = {"setting": name, "k": k, "n": n, "M": big_m, "auto_lambdas": auto[:big_m],
                   "auto": _point(got, float(np.mean(auto[:big_m]))),
                   "best": _point(res[best], best), "lambda0": _point(zero),
                   "grid": [_point(r, lam) for lam, r in res.items()],
                   "ratio_auto_best": got.mean / res[best].mean,
                   "goal_met": bool(got.mean >= 0.9 * res[best].mean and got.mean >= zero.mean),
                   "seconds_auto_lambda": t_auto, "seconds_inverse_gram": t_inverse}
            rows.append(row)
            print(f"{name} k={k} M={big_m}: auto {got.mean:.3f}, best {res[best].mean:.3f} "
                  f"(λ={best:.3g}), λ=0 {zero.mean:.3f}", flush=True)
        if check_library and check is None:  # the largest M, library path, same features
            lib = trax_attr.trak_scores(phi[:big_m], q[:big_m], phi_t[:big_m], "auto")
            ours, theirs = got.mean, lds(np.asarray(lib), s.masks, s.margins).mean
            check = {"setting": name, "k": k, "M": big_m, "lds_eigen_path": ours,
                     "lds_trak_scores": theirs, "abs_diff": abs(ours - theirs),
                     "met": bool(abs(ours - theirs) <= 1e-3)}
    return rows, check


def table(rows) -> str:
    ci = lambda p: f"{p['lds']:.3f} [{p['low']:.3f}, {p['high']:.3f}]"  # noqa: E731
    lines = [f"{'setting':17} {'k':>5} {'n':>5} {'M':>3} | {'auto λ':>8} {'auto LDS [95% CI]':>21}"
             f" | {'best λ':>8} {'best LDS [95% CI]':>21} | {'λ=0 LDS [95% CI]':>21} | "
             "auto/best goal"]
    for r in rows:
        lines.append(f"{r['setting']:17} {r['k']:5d} {r['n']:5d} {r['M']:3d} | "
                     f"{r['auto']['lambda']:8.3g} {ci(r['auto'])} | {r['best']['lambda']:8.3g} "
                     f"{ci(r['best'])} | {ci(r['lambda0'])} | {r['ratio_auto_best']:9.3f} "
                     f"{'met' if r['goal_met'] else 'NOT met'}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny settings: a smoke test")
    ap.add_argument("--only", nargs="*", choices=sorted(FULL), help="settings to run")
    ap.add_argument("--cache", default=str(CACHE), help="folder of retrained ground truth")
    args = ap.parse_args(argv)
    settings = QUICK if args.quick else FULL
    if set(args.only or ()) - set(settings):
        ap.error(f"--quick has only the settings {sorted(settings)}")
    # absolute λ in quarter decades (half decades in --quick); λ = 0 is scored apart
    grid = np.logspace(-2, 4, 13) if args.quick else np.logspace(-3, 5, 33)
    wall = time.perf_counter()
    rows, meta, check = [], {}, None
    for name, (build, cfg) in settings.items():
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        setting = build(cfg, args.cache)
        built = time.perf_counter() - start
        got, one = evaluate(name, setting, cfg, grid, check_library=check is None)
        rows += got
        check = check or one
        meta[name] = {"description": " ".join(build.__doc__.split()), "config": cfg,
                      "seconds_build": built, "seconds": time.perf_counter() - start}
    wall = time.perf_counter() - wall
    worst = min(rows, key=lambda r: r["ratio_auto_best"])
    met = all(r["goal_met"] for r in rows)
    times = [r[f"seconds_{x}"] for r in rows for x in ("auto_lambda", "inverse_gram")]
    print(f"\nLDS of lambda_reg='auto' vs the best λ of the grid vs λ = 0 (95% bootstrap CI "
          f"over targets; auto's λ: mean over checkpoints)\n{table(rows)}\n"
          f"worst auto/best {worst['ratio_auto_best']:.3f} ({worst['setting']}, k={worst['k']}, "
          f"M={worst['M']}); goal met in every row: {met}"
          f"{' (--quick: tiny, noisy settings; judged on the full run)' if args.quick else ''}\n"
          f"auto adds {min(times[::2]) * 1e6:.0f}–{max(times[::2]) * 1e6:.0f} µs per checkpoint "
          f"to finalize, whose inverse_gram takes {min(times[1::2]) * 1e3:.1f}–"
          f"{max(times[1::2]) * 1e3:.0f} ms; trak_scores cross-check ({check['setting']}, "
          f"k={check['k']}, M={check['M']}): LDS {check['lds_trak_scores']:.5f} vs "
          f"{check['lds_eigen_path']:.5f}, {'met' if check['met'] else 'NOT met'}; {wall:.0f} s")
    out = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                      f"{jax.device_count()} {jax.default_backend()} device(s)",
           "command": "PYTHONPATH=src python benchmarks/lambda_auto.py " + " ".join(
               sys.argv[1:] if argv is None else argv),
           "quick": args.quick, "grid": grid.tolist(), "settings": meta, "rows": rows,
           "library_cross_check": check, "goal_met_everywhere": met,
           "goal": "auto >= 0.9 x the best grid lambda and auto >= lambda = 0, in every row",
           "worst_ratio_auto_best": worst["ratio_auto_best"], "seconds_wall": wall}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / ("lambda_auto_quick.json" if args.quick else "lambda_auto.json")
    path.write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
