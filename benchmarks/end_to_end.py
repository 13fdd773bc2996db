"""End to end: featurize + finalize_features + score, wall time and peak RSS, both libraries.

The same 64-128-10 MLP (trax_attr: linen; traker 0.3.2: torch twin with the same weights)
and proj_dim, on digits tiled with noise to several n_train. Each measurement runs in its
own subprocess, so its peak resident memory (ru_maxrss of the child) is its own; the RSS
after imports and model set-up is reported too. Goal: peak memory independent of n_train.

Every point runs twice: with glibc's default malloc, and with its mmap threshold fixed
(MALLOC_MMAP_THRESHOLD_=131072). By default glibc raises that threshold after the first
large free, so later large buffers come from heaps it rarely returns to the system, and
RSS jumps by tens of MiB at run-dependent moments; with the threshold fixed, large
buffers are mapped and unmapped and the peak shows what each library holds.

    PYTHONPATH=src python benchmarks/end_to_end.py [--quick]

Writes benchmarks/results/end_to_end.json (end_to_end_quick.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PROJ_DIM, N_TARGETS, BATCH, HIDDEN = 512, 100, 500, 128
LIBRARIES = ("trax_attr", "traker 0.3.2")
MALLOC = {"glibc default": {}, "fixed mmap threshold": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def data(n: int):
    """Digits tiled to n rows with N(0, 0.05) pixel noise; targets are the first 100 rows."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    idx = np.arange(n) % len(x)
    # float32 noise: a float64 draw would be the process's largest array at 64k rows
    xt = x[idx] + np.float32(0.05) * rng.standard_normal((n, x.shape[1]), dtype=np.float32)
    return (xt, y[idx]), (x[:N_TARGETS], y[:N_TARGETS])


def child(library: str, n: int) -> dict:
    import jax

    from _mlp import MLP, TORCH_NAMES, torch_twin

    (x, y), (tx, ty) = data(n)
    params = MLP(HIDDEN).init(jax.random.key(0), x[:1])
    with tempfile.TemporaryDirectory() as tmp:
        if library == "trax_attr":
            import trax_attr

            y32, ty32 = y.astype(np.int32), ty.astype(np.int32)
            base = rss_mib()
            start = time.perf_counter()
            traker = trax_attr.TRAKer(model=MLP(HIDDEN), task="image_classification",
                                      train_set_size=n, save_dir=tmp, proj_dim=PROJ_DIM,
                                      lambda_reg=1e-2)
            traker.load_checkpoint(params, model_id=0)
            for s in range(0, n, BATCH):
                traker.featurize((x[s:s + BATCH], y32[s:s + BATCH]),
                                 num_samples=len(x[s:s + BATCH]))
            traker.finalize_features()
            traker.start_scoring_checkpoint("t", params, model_id=0, num_targets=N_TARGETS)
            traker.score((tx, ty32), num_samples=N_TARGETS)
            scores = np.asarray(traker.finalize_scores("t"))
        else:
            import torch
            import trak

            from trax_attr.interop import flax_to_torch

            torch.set_num_threads(2)
            model = torch_twin(HIDDEN)
            model.load_state_dict(flax_to_torch(params, model, names=TORCH_NAMES))
            model.eval()
            xt_, yt_ = torch.from_numpy(x), torch.from_numpy(y)
            base = rss_mib()
            start = time.perf_counter()
            traker = trak.TRAKer(model=model, task="image_classification", train_set_size=n,
                                 save_dir=tmp, device="cpu", use_half_precision=False,
                                 lambda_reg=1e-2, proj_dim=PROJ_DIM,
                                 logging_level=logging.ERROR)
            traker.load_checkpoint(model.state_dict(), model_id=0)
            for s in range(0, n, BATCH):
                traker.featurize(batch=(xt_[s:s + BATCH], yt_[s:s + BATCH]),
                                 num_samples=len(xt_[s:s + BATCH]))
            traker.finalize_features()
            traker.start_scoring_checkpoint(exp_name="t", checkpoint=model.state_dict(),
                                            model_id=0, num_targets=N_TARGETS)
            traker.score(batch=(torch.from_numpy(tx), torch.from_numpy(ty)),
                         num_samples=N_TARGETS)
            scores = np.asarray(traker.finalize_scores(exp_name="t"))
        seconds = time.perf_counter() - start
    assert scores.shape == (n, N_TARGETS) and np.isfinite(scores).all()
    return {"library": library, "n_train": n, "seconds": seconds,
            "rss_before_mib": base, "peak_rss_mib": rss_mib()}


def verdict(rows, sizes):
    """Peak RSS growth per library and malloc setting: over the whole range, and over its
    last 4x of rows.

    "independent": < 10% growth from the smallest to the largest n_train. "bounded": < 10%
    growth over the last 4x of n_train, i.e. the peak has stopped growing once the rows
    exceed what the library holds at once. The dense (n_train, n_targets) float32 result
    both libraries return is O(n_train) by definition, and so is the benchmark's own data
    (in the RSS after set-up): "working memory" is the peak less both, judged by the same
    10% rule.
    """
    out = {}
    last = next(i for i, n in enumerate(sizes) if n * 4 >= sizes[-1])
    for lib in LIBRARIES:
        for malloc in MALLOC:
            mine = [r for r in rows if r["library"] == lib and r["malloc"] == malloc]
            peaks = [r["peak_rss_mib"] for r in mine]
            growth, tail = peaks[-1] - peaks[0], peaks[-1] - peaks[last]
            scores = [n * N_TARGETS * 4 / 2**20 for n in sizes]
            # what the library holds: the peak less the RSS after set-up (imports, the
            # benchmark's own data) and less the returned score matrix
            working = [r["peak_rss_mib"] - r["rss_before_mib"] - sc
                       for r, sc in zip(mine, scores)]
            out[f"{lib}, {malloc}"] = {
                "peak_rss_mib": peaks, "growth_mib": growth,
                "growth_per_1k_rows_mib": growth / ((sizes[-1] - sizes[0]) / 1000),
                "independent_of_n_train": bool(growth < 0.1 * peaks[0]),
                "growth_last_4x_mib": tail, "last_4x_from": sizes[last],
                "bounded": bool(tail < 0.1 * peaks[last]),
                "scores_mib": scores,
                "working_mib": working,
                "working_growth_mib": working[-1] - working[0],
                # the same 10%-of-the-peak rule on that working memory's growth
                "working_memory_independent": bool(working[-1] - working[0]
                                                   < 0.1 * peaks[0])}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("LIBRARY", "N"))
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    sizes = (500, 1000) if args.quick else (1000, 4000, 16000, 64000)
    rows = []
    for n in sizes:
        for lib in LIBRARIES:
            for malloc, env in MALLOC.items():
                done = subprocess.run([sys.executable, __file__, "--child", lib, str(n)],
                                      check=True, capture_output=True, text=True,
                                      env={**os.environ, **env})
                rows.append({**json.loads(done.stdout.strip().splitlines()[-1]),
                             "malloc": malloc})
                r = rows[-1]
                print(f"{lib:13} n_train={n:6d} {malloc:21} {r['seconds']:7.2f} s  peak RSS "
                      f"{r['peak_rss_mib']:7.0f} MiB (after set-up {r['rss_before_mib']:.0f})",
                      flush=True)
    by = {(r["library"], r["n_train"]): r for r in rows if r["malloc"] == "glibc default"}
    fixed = {(r["library"], r["n_train"]): r for r in rows
             if r["malloc"] == "fixed mmap threshold"}
    print(f"\nfeaturize + finalize + score, MLP 64-{HIDDEN}-10, proj_dim={PROJ_DIM}, "
          f"{N_TARGETS} targets, one checkpoint, a subprocess each")
    print("(time and first peak: glibc default malloc; second peak: fixed mmap threshold)")
    print(f"{'n_train':>8} | {'trax_attr s':>11} {'peak MiB':>13} | {'traker s':>9} "
          f"{'peak MiB':>13} | speed-up")
    for n in sizes:
        a, b = by[("trax_attr", n)], by[("traker 0.3.2", n)]
        fa, fb = fixed[("trax_attr", n)], fixed[("traker 0.3.2", n)]
        print(f"{n:8d} | {a['seconds']:11.2f} {a['peak_rss_mib']:6.0f} {fa['peak_rss_mib']:6.0f} | "
              f"{b['seconds']:9.2f} {b['peak_rss_mib']:6.0f} {fb['peak_rss_mib']:6.0f} | "
              f"{b['seconds'] / a['seconds']:6.2f}x")
    memory = verdict(rows, sizes)
    for lib, v in memory.items():
        print(f"goal peak memory independent of n_train, {lib}: "
              f"{'met' if v['independent_of_n_train'] else 'NOT met'} "
              f"({v['growth_mib']:+.0f} MiB from {sizes[0]} to {sizes[-1]} rows); bounded: "
              f"{'yes' if v['bounded'] else 'no'} ({v['growth_last_4x_mib']:+.0f} MiB from "
              f"{v['last_4x_from']} to {sizes[-1]} rows; the returned scores grow by "
              f"{v['scores_mib'][-1] - v['scores_mib'][sizes.index(v['last_4x_from'])]:.0f} MiB); "
              f"working memory (peak less set-up RSS and score matrix) "
              f"{', '.join(f'{w:.0f}' for w in v['working_mib'])} MiB, growth < 10% of the "
              f"peak: "
              f"{'met' if v['working_memory_independent'] else 'NOT met'}")
    out = {"machine": platform.processor() or platform.machine(), "quick": args.quick,
           "proj_dim": PROJ_DIM, "n_targets": N_TARGETS, "model": f"MLP 64-{HIDDEN}-10",
           "rows": rows, "speedup": {str(n): by[("traker 0.3.2", n)]["seconds"]
                                     / by[("trax_attr", n)]["seconds"] for n in sizes},
           "memory": memory}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / ("end_to_end_quick.json" if args.quick else "end_to_end.json")
    path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
