"""Projection throughput of trax_attr.project against this machine's matmul rate.

FLOP per example = 2 d k. Reports FLOP/s of ``project`` (float32 and bfloat16 compute,
P regenerated per batch) and of a plain (B, d) @ (d, k) matmul of the same dtype measured
in the same run, and their ratio (goal: >= 0.6 for d >= 1e5).

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


def measure(d, k, dtype, batch, repeats):
    key = P.projection_key(0, 0)
    g = jax.random.normal(jax.random.key(1), (batch, d), jnp.float32)
    proj = P.rademacher(k, dtype=jnp.dtype(dtype))
    f_proj = jax.jit(lambda g: P.project(proj, key, (g,)))
    m = jax.random.normal(jax.random.key(2), (d, k), jnp.float32).astype(dtype)
    f_mm = jax.jit(lambda g, m: jnp.dot(g.astype(dtype), m, preferred_element_type=jnp.float32))
    flop = 2.0 * d * k * batch
    t_p = best_time(f_proj, g, repeats=repeats)
    t_m = best_time(f_mm, g, m, repeats=repeats)
    return {"d": d, "k": k, "dtype": dtype, "batch": batch,
            "project_flops": flop / t_p, "matmul_flops": flop / t_m,
            "ratio": (flop / t_p) / (flop / t_m)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        grid, batch, repeats = [(1000, 64)], 8, 1
    else:
        grid, batch, repeats = [(10_000, 512), (100_000, 512), (100_000, 2048),
                                (300_000, 512)], 32, 2
    rows = [measure(d, k, dt, batch, repeats) for d, k in grid for dt in ("float32", "bfloat16")]
    out = {"machine": platform.platform(), "backend": jax.default_backend(), "quick": args.quick,
           "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    name = "projection_roofline_quick.json" if args.quick else "projection_roofline.json"
    (RESULTS / name).write_text(json.dumps(out, indent=1))
    print(f"{'d':>9} {'k':>5} {'dtype':>8} {'project GF/s':>12} {'matmul GF/s':>12} {'ratio':>6}")
    for r in rows:
        print(f"{r['d']:>9} {r['k']:>5} {r['dtype']:>8} {r['project_flops']/1e9:>12.2f} "
              f"{r['matmul_flops']/1e9:>12.2f} {r['ratio']:>6.2f}")
    return out


if __name__ == "__main__":
    main()
