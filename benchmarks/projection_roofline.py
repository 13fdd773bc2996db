"""Projection throughput of trax_attr.project against this machine's matmul rate.

FLOP per example = 2 d k. Reports FLOP/s of ``project`` (float32 and bfloat16 compute,
P regenerated per batch) against this machine's matmul rate of the same dtype measured in
the same run, and their ratio (goal: >= 0.6 for d >= 1e5). The rate is measured on a fixed
block, a (B, 8192) @ (8192, k) product: a dense (d, k) reference would not fit in memory
at d = 1e6..1e7, and the rate per FLOP is what the roofline needs. "ratio" compares with
the block at the same batch (the goal); "of peak" with the fastest block of the run (small
batches make a matmul memory-bound).

    python benchmarks/projection_roofline.py [--quick]

Writes benchmarks/results/projection_roofline.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from trax_attr import projection as P

RESULTS = Path(__file__).parent / "results"


def best_time(fn, *args, repeats=3):
    jax.block_until_ready(fn(*args))  # warm-up / compile
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


MATMUL_BLOCK = 8192  # inner dimension of the reference matmul


def matmul_rate(k, dtype, batch, repeats):
    """FLOP/s of a (batch, 8192) @ (8192, k) product in ``dtype``, float32 accumulation."""
    g = jax.random.normal(jax.random.key(1), (batch, MATMUL_BLOCK), jnp.float32).astype(dtype)
    m = jax.random.normal(jax.random.key(2), (MATMUL_BLOCK, k), jnp.float32).astype(dtype)
    f_mm = jax.jit(lambda g, m: jnp.dot(g, m, preferred_element_type=jnp.float32))
    return 2.0 * MATMUL_BLOCK * k * batch / best_time(f_mm, g, m, repeats=repeats)


def measure(d, k, dtype, batch, repeats, rates):
    key = P.projection_key(0, 0)
    g = jax.random.normal(jax.random.key(1), (batch, d), jnp.float32)
    proj = P.rademacher(k, dtype=jnp.dtype(dtype))
    f_proj = jax.jit(lambda g: P.project(proj, key, (g,)))
    flop = 2.0 * d * k * batch
    t_p = best_time(f_proj, g, repeats=repeats)
    if (k, dtype, batch) not in rates:
        rates[(k, dtype, batch)] = matmul_rate(k, dtype, batch, repeats)
    rate = rates[(k, dtype, batch)]
    return {"d": d, "k": k, "dtype": dtype, "batch": batch,
            "project_flops": flop / t_p, "matmul_flops": rate, "ratio": (flop / t_p) / rate}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        grid, repeats = [(1000, 64, 8)], 1
    else:  # (d, k, batch): fewer examples per batch at large d keep each call ~1 s
        grid, repeats = [(10_000, 512, 32), (100_000, 512, 32), (100_000, 2048, 32),
                         (100_000, 8192, 8), (300_000, 512, 32), (1_000_000, 512, 8),
                         (1_000_000, 2048, 4), (10_000_000, 512, 2)], 2
    rates = {}
    rows = [measure(d, k, dt, batch, repeats, rates) for d, k, batch in grid
            for dt in ("float32", "bfloat16")]
    # small batches (large d) make the reference matmul memory-bound; the peak over the
    # run's blocks is the machine's rate for this dtype, reported alongside
    peak = {dt: max(v for (_, d2, _), v in rates.items() if d2 == dt) for _, dt, _ in rates}
    for r in rows:
        r["ratio_to_peak"] = r["project_flops"] / peak[r["dtype"]]
    goal = {}
    for dt in ("float32", "bfloat16"):
        big = [r for r in rows if r["dtype"] == dt and r["d"] >= 100_000]
        goal[dt] = {"met": all(r["ratio"] >= 0.6 for r in big) if big else None,
                    "min_ratio": min((r["ratio"] for r in big), default=None),
                    "points_below": [(r["d"], r["k"], round(r["ratio"], 3)) for r in big
                                     if r["ratio"] < 0.6]}
    out = {"machine": platform.platform(), "backend": jax.default_backend(), "quick": args.quick,
           "matmul_reference": f"(batch, {MATMUL_BLOCK}) @ ({MATMUL_BLOCK}, k), same dtype",
           "peak_matmul_flops": peak, "rows": rows,
           "goal_ratio_ge_0.6_for_d_ge_1e5": goal}
    RESULTS.mkdir(exist_ok=True)
    name = "projection_roofline_quick.json" if args.quick else "projection_roofline.json"
    (RESULTS / name).write_text(json.dumps(out, indent=1))
    print(f"{'d':>9} {'k':>5} {'dtype':>8} {'project GF/s':>12} {'matmul GF/s':>12} {'ratio':>6} {'of peak':>7}")
    for r in rows:
        print(f"{r['d']:>9} {r['k']:>5} {r['dtype']:>8} {r['project_flops']/1e9:>12.2f} "
              f"{r['matmul_flops']/1e9:>12.2f} {r['ratio']:>6.2f} {r['ratio_to_peak']:>7.2f}")
    for dt, g in goal.items():
        print(f"goal >= 60% of the matmul rate for d >= 1e5, {dt}: "
              f"{ {True: 'met', False: 'NOT met', None: 'no point'}[g['met']]} (lowest {g['min_ratio'] or float('nan'):.2f})")
    return out


if __name__ == "__main__":
    main()
