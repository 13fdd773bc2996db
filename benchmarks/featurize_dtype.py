"""Featurize throughput by projection dtype and cache, to choose the defaults.

For an MLP 64-128-10 at k = 512 and a wide MLP 64-1024-1024-10 (d = 1.13M) at k = 2048,
measures examples/s of the jitted per-example-gradient + projection step (after warm-up)
for float32 and bfloat16 compute, with P cached per checkpoint and regenerated per batch,
and the relative error of bfloat16 features against float32 ones.

    python benchmarks/featurize_dtype.py [--quick]

Writes benchmarks/results/featurize_dtype.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import trax_attr
from trax_attr.engine import Checkpoint, Featurizer, features
from trax_attr.gradients import select


def mlp(widths, key):
    params = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        params.append({"w": jax.random.normal(jax.random.fold_in(key, i), (a, b)) / np.sqrt(a),
                       "b": jnp.zeros(b)})
    return params


def mlp_apply(params, x):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def throughput(projector, params, batch, repeats):
    model = trax_attr.as_model(mlp_apply)
    selection = select(params)
    f = Featurizer(trax_attr.get_task("classification"), model, selection, projector)
    step = jax.jit(lambda ckpt, batch: features(f, ckpt, batch))
    selected, rest = selection.split(params)
    key = trax_attr.projection_key(0, 0)
    t0 = time.perf_counter()
    cache = trax_attr.projection_cache(projector, key, selection.sizes)
    if cache is not None:
        jax.block_until_ready(cache)
    cache_s = time.perf_counter() - t0
    ckpt = Checkpoint(selected, rest, None, key, cache)
    phi = jax.block_until_ready(step(ckpt, batch)[0])   # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(step(ckpt, batch))
    seconds = (time.perf_counter() - t0) / repeats
    return len(batch[0]) / seconds, cache_s, cache is not None, np.asarray(phi)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batches, one repeat")
    args = parser.parse_args()
    cases = [("mlp 64-128-10", (64, 128, 10), 512, 1024),
             ("mlp 64-1024-1024-10", (64, 1024, 1024, 10), 2048, 128)]
    rows = []
    for name, widths, k, batch_size in cases:
        if args.quick:
            batch_size = min(batch_size, 64)
        params = mlp(widths, jax.random.key(0))
        d = select(params).grad_dim
        x = jax.random.uniform(jax.random.key(1), (batch_size, widths[0]))
        y = jax.random.randint(jax.random.key(2), (batch_size,), 0, widths[-1])
        variants = {
            "float32, cached": trax_attr.rademacher(k, dtype=jnp.float32, max_cache_bytes=1 << 34),
            "bfloat16, cached": trax_attr.rademacher(k, max_cache_bytes=1 << 34),
            "bfloat16, regenerated": trax_attr.rademacher(k, max_cache_bytes=0),
            "float32, regenerated": trax_attr.rademacher(k, dtype=jnp.float32, max_cache_bytes=0),
        }
        results = {}
        for label, projector in variants.items():
            results[label] = throughput(projector, params, (x, y), 1 if args.quick else 3)
        exact = results["float32, cached"][3]
        for label, (rate, cache_s, cached, phi) in results.items():
            flops = 2 * d * k * rate
            rows.append({
                "model": name, "d": d, "k": k, "batch": batch_size, "variant": label,
                "examples_per_s": rate, "projection_gflops": flops / 1e9,
                "cache_build_s": cache_s if cached else None,
                "rel_error_vs_float32": float(np.linalg.norm(phi - exact) / np.linalg.norm(exact)),
            })
    out = {"machine": f"{platform.processor() or platform.machine()}, {jax.device_count()} "
                      f"{jax.devices()[0].platform} device(s)", "jax": jax.__version__,
           "command": "python benchmarks/featurize_dtype.py", "rows": rows}
    path = Path(__file__).parent / "results" / "featurize_dtype.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"{'model':22} {'variant':24} {'ex/s':>9} {'GFLOP/s':>8} {'cache s':>8} {'rel err':>8}")
    for r in rows:
        cache = "-" if r["cache_build_s"] is None else f"{r['cache_build_s']:.2f}"
        print(f"{r['model']:22} {r['variant']:24} {r['examples_per_s']:9.1f} "
              f"{r['projection_gflops']:8.1f} {cache:>8} {r['rel_error_vs_float32']:8.1e}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
