"""LDS and wall time of trax_attr and traker 0.3.2 on the same digits checkpoints.

A 64-64-10 MLP is trained M_max times (seeds 0..M_max-1) on the digits train split; the
same weights go into a torch twin (interop.flax_to_torch). For each ensemble size M and
proj_dim k, both libraries featurize + finalize + score, and the LDS of their scores is
measured against one counterfactual ground truth (evaluation.subset_retraining, cached in
.cache/). Baselines (gradient dot, gradient cosine on full gradients of checkpoint 0,
random) are scored once.

    PYTHONPATH=src python benchmarks/lds_digits.py [--quick]

Writes benchmarks/results/lds_digits.json (lds_digits_quick.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from _mlp import MLP, TORCH_NAMES, shuffled_digits, torch_twin, trak_scores, train
from trax_attr.evaluation import (grad_cosine_scores, grad_dot_scores, lds, random_scores,
                                  subset_retraining)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / ".cache" / "lds_digits"
LAMBDA = 1e-2  # the same ridge for both libraries (k = 2048 > n_train needs one)
FULL = dict(n_train=1000, n_targets=200, subsets=256, ensembles=(1, 5, 10),
            proj_dims=(512, 2048), steps=300)
QUICK = dict(n_train=300, n_targets=20, subsets=24, ensembles=(1, 2), proj_dims=(256,),
             steps=100)


def ours(checkpoints, train_set, targets, k):
    """(scores (n_train, n_targets), seconds of featurize + finalize + score)."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        scores, _ = trak_scores(tmp, checkpoints, train_set, targets, proj_dim=k,
                                lambda_reg=LAMBDA)
        return scores, time.perf_counter() - start


def reference(checkpoints, train_set, targets, k):
    """traker 0.3.2 on torch twins holding the same weights; its CPU BasicProjector."""
    import torch
    import trak

    from trax_attr.interop import flax_to_torch

    torch.set_num_threads(2)
    twins = []
    for ckpt in checkpoints:
        model = torch_twin()
        model.load_state_dict(flax_to_torch(ckpt, model, names=TORCH_NAMES))
        twins.append(model.eval())
    x, y = torch.from_numpy(train_set[0]), torch.from_numpy(train_set[1]).long()
    tx, ty = torch.from_numpy(targets[0]), torch.from_numpy(targets[1]).long()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        traker = trak.TRAKer(model=twins[0], task="image_classification",
                             train_set_size=len(x), save_dir=tmp, device="cpu",
                             use_half_precision=False, lambda_reg=LAMBDA, proj_dim=k,
                             logging_level=logging.ERROR)
        for m, model in enumerate(twins):
            # loads the weights into traker's own model (twins[0]), as traker expects
            traker.load_checkpoint(model.state_dict(), model_id=m)
            for s in range(0, len(x), 500):
                traker.featurize(batch=(x[s:s + 500], y[s:s + 500]),
                                 num_samples=len(x[s:s + 500]))
        traker.finalize_features()
        for m, model in enumerate(twins):
            traker.start_scoring_checkpoint(exp_name="t", checkpoint=model.state_dict(),
                                            model_id=m, num_targets=len(tx))
            traker.score(batch=(tx, ty), num_samples=len(tx))
        scores = np.asarray(traker.finalize_scores(exp_name="t"))
        return scores, time.perf_counter() - start


def full_gradients(ckpt, x, y):
    """(n, d) f32 per-example gradients of the margin, all parameters (the baselines)."""
    module = MLP()

    def margin(p, xi, yi):
        logits = module.apply({"params": p}, xi[None])[0]
        others = jnp.where(jnp.arange(10) == yi, -jnp.inf, logits)
        return logits[yi] - jax.nn.logsumexp(others)

    grads = jax.jit(jax.vmap(jax.grad(margin), (None, 0, 0)))(ckpt["params"], x, y)
    leaves = jax.tree_util.tree_leaves(grads)
    return np.concatenate([np.asarray(g).reshape(len(x), -1) for g in leaves], axis=1)


def point(r):
    return {"lds": r.mean, "low": r.low, "high": r.high}


def goal_checks(rows):
    by = {(r["library"], r["M"], r["k"]): r for r in rows}
    keys = sorted({(r["M"], r["k"]) for r in rows})
    accuracy, speed, rising = [], [], []
    for m, k in keys:
        a, b = by[("trax_attr", m, k)], by[("traker 0.3.2", m, k)]
        ok = a["lds"] >= b["lds"] or a["high"] >= b["low"]
        accuracy.append({"M": m, "k": k, "met": bool(ok), "lds_diff": a["lds"] - b["lds"]})
        # traker's point lies on or under trax_attr's curve: some trax_attr point reaches
        # its LDS (at least, or within its CI, as for accuracy above) in no more time
        ok = any(o["library"] == "trax_attr" and o["seconds"] <= b["seconds"]
                 and (o["lds"] >= b["lds"] or o["high"] >= b["low"]) for o in rows)
        speed.append({"M": m, "k": k, "met": bool(ok), "time_ratio": b["seconds"] / a["seconds"],
                      "lds_diff": a["lds"] - b["lds"]})
    for lib in ("trax_attr", "traker 0.3.2"):
        for k in sorted({r["k"] for r in rows}):
            curve = [by[(lib, m, k)] for m, _ in keys if _ == k]
            drops = [(c0["M"], c1["M"], c1["lds"] - c0["lds"]) for c0, c1 in zip(curve, curve[1:])
                     if c1["lds"] < c0["lds"] and c1["high"] < c0["low"]]
            rising.append({"library": lib, "k": k, "lds_by_M": [c["lds"] for c in curve],
                           "met": not drops, "significant_drops": drops})
    return {
        "lds_at_equal_M_k_at_least_traker_or_within_ci": {
            "met": all(c["met"] for c in accuracy), "points": accuracy},
        "lds_rising_with_M": {"met": all(c["met"] for c in rising
                                         if c["library"] == "trax_attr"),
                              "curves": rising,
                              "rule": "trax_attr's curves: no drop from M to the next M beyond "
                                      "both CIs (traker's curves reported, not judged)"},
        "lds_vs_time_above_traker_at_every_point": {
            "met": all(c["met"] for c in speed), "points": speed,
            "rule": "for each traker point, a trax_attr point with time <= and LDS >= (or "
                    "its CI reaching traker's)"},
    }


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    x, y = shuffled_digits()
    n, nt = cfg["n_train"], cfg["n_targets"]
    train_set = (x[:n], y[:n])
    targets = (x[len(x) - nt:], y[len(x) - nt:])  # from the held-out end of the split

    t0 = time.perf_counter()
    checkpoints = [train(jnp.asarray(train_set[0]), jnp.asarray(train_set[1]), s, cfg["steps"])
                   for s in range(max(cfg["ensembles"]))]
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    masks, margins = subset_retraining(jax.random.key(1), train_set, targets,
                                       num_models=cfg["subsets"], alpha=0.5, hidden=(64,),
                                       steps=cfg["steps"], cache_dir=CACHE)
    t_truth = time.perf_counter() - t0

    # First run of each library per k, at the timed shapes: imports, thread pools and
    # trax_attr's jit compiles (shared by later TRAKers of the process) are paid here and
    # reported apart as first_run_seconds; the timed points are the steady state.
    first_run = []
    rows = []
    for k in cfg["proj_dims"]:
        for lib, fn in (("trax_attr", ours), ("traker 0.3.2", reference)):
            _, seconds = fn(checkpoints[:1], train_set, targets, k)
            first_run.append({"library": lib, "M": 1, "k": k, "seconds": seconds})
            print(f"{lib:13} first run M=1 k={k:5d}  {seconds:6.2f} s", flush=True)
        for m in cfg["ensembles"]:
            for lib, fn in (("trax_attr", ours), ("traker 0.3.2", reference)):
                scores, seconds = fn(checkpoints[:m], train_set, targets, k)
                r = lds(scores, masks, margins)
                rows.append({"library": lib, "M": m, "k": k, "seconds": seconds, **point(r)})
                print(f"{lib:13} M={m:2d} k={k:5d}  LDS {r.mean:.3f} [{r.low:.3f}, {r.high:.3f}]"
                      f"  {seconds:6.2f} s", flush=True)
    g = full_gradients(checkpoints[0], jnp.asarray(targets[0]), jnp.asarray(targets[1]))
    gt = full_gradients(checkpoints[0], jnp.asarray(train_set[0]), jnp.asarray(train_set[1]))
    baselines = {"grad_dot": grad_dot_scores(gt, g), "grad_cosine": grad_cosine_scores(gt, g),
                 "random": random_scores(jax.random.key(3), n, nt)}
    base = {name: point(lds(s, masks, margins)) for name, s in baselines.items()}
    checks = goal_checks(rows)

    print(f"\nLDS on digits (n_train={n}, {nt} targets, S={cfg['subsets']} subsets at "
          f"alpha=0.5, lambda_reg={LAMBDA}); time = featurize + finalize + score")
    print(f"{'M':>3} {'k':>5} | {'trax_attr LDS [95% CI]':>24} {'s':>6} | "
          f"{'traker 0.3.2 LDS [95% CI]':>26} {'s':>6} | speed-up")
    by = {(r["library"], r["M"], r["k"]): r for r in rows}
    for k in cfg["proj_dims"]:
        for m in cfg["ensembles"]:
            a, b = by[("trax_attr", m, k)], by[("traker 0.3.2", m, k)]
            print(f"{m:3d} {k:5d} | {a['lds']:6.3f} [{a['low']:.3f}, {a['high']:.3f}]    "
                  f"{a['seconds']:6.2f} | {b['lds']:6.3f} [{b['low']:.3f}, {b['high']:.3f}]      "
                  f"{b['seconds']:6.2f} | {b['seconds'] / a['seconds']:5.1f}x")
    for name, r in base.items():
        print(f"baseline {name:11} LDS {r['lds']:6.3f} [{r['low']:.3f}, {r['high']:.3f}]")
    for name, c in checks.items():
        print(f"goal {name}: {'met' if c['met'] else 'NOT met'}")

    out = {"machine": platform.processor() or platform.machine(), "quick": args.quick,
           "config": {**cfg, "lambda_reg": LAMBDA, "alpha": 0.5},
           "seconds_train_checkpoints": t_train, "seconds_ground_truth": t_truth,
           "first_run_seconds": first_run, "rows": rows, "baselines": base, "goals": checks}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / ("lds_digits_quick.json" if args.quick else "lds_digits.json")
    path.write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
