"""Which generator makes P fastest: the counter hash, or jax.random (threefry, rbg)?

For each generator, two figures on this machine's default backend, side by side in one
run so that the ratio holds on a shared machine:

* entries/s: one (16384, k) block of P, bfloat16, generated inside jit (best of repeats);
* featurize ex/s: the MLP 64-256-256-10 (d = 85k), k = 512, batch 256, bfloat16 (the
  whole per-batch step, gradients included).

    PYTHONPATH=src python benchmarks/generators.py [--quick]

Writes benchmarks/results/generators.json (generators_quick.json with --quick) and prints
a table. The default generator per backend is the fastest measured here (hash on CPU).
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
from trax_attr.engine import Featurizer, features, prepare

RESULTS = Path(__file__).resolve().parent / "results"
GENERATORS = ("hash", "threefry", "rbg")


def best_of(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def entries_per_second(generator: str, rows: int, k: int, repeats: int) -> float:
    proj = trax_attr.rademacher(k, generator=generator)
    key = trax_attr.projection_key(0, 0)
    block = jax.jit(lambda start: proj.matrix_block(key, start, rows))
    return rows * k / best_of(lambda: block(jnp.int32(1000)), repeats)


def mlp(widths, key):
    return [{"w": jax.random.normal(jax.random.fold_in(key, i), (a, b)) / np.sqrt(a),
             "b": jnp.zeros(b)} for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))]


def mlp_apply(params, x):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def featurize_rate(generator: str, widths, k: int, batch: int, repeats: int) -> float:
    params = mlp(widths, jax.random.key(0))
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(batch, widths[0])).astype(np.float32),
            rng.integers(0, widths[-1], batch).astype(np.int32))
    f = Featurizer(trax_attr.get_task("classification"), trax_attr.as_model(mlp_apply),
                   trax_attr.select(params), trax_attr.rademacher(k, generator=generator))
    ckpt = prepare(f, params, None, 0, 0)
    step = jax.jit(lambda c, b: features(f, c, b))
    return batch / best_of(lambda: step(ckpt, data), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    args = parser.parse_args()
    rows, k, batch, repeats = (1024, 128, 32, 1) if args.quick else (16384, 512, 256, 5)
    widths = (64, 64, 10) if args.quick else (64, 256, 256, 10)
    table = []
    for generator in GENERATORS:
        table.append({"generator": generator,
                      "entries_per_s": entries_per_second(generator, rows, k, repeats),
                      "featurize_ex_per_s": featurize_rate(generator, widths, k, batch,
                                                           repeats)})
    base = table[0]
    for row in table:
        row["entries_ratio_to_hash"] = row["entries_per_s"] / base["entries_per_s"]
        row["featurize_ratio_to_hash"] = row["featurize_ex_per_s"] / base["featurize_ex_per_s"]
    result = {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
              "machine": platform.processor() or platform.machine(),
              "command": "PYTHONPATH=src python benchmarks/generators.py"
                         + (" --quick" if args.quick else ""),
              "block": [rows, k], "mlp": list(widths), "batch": batch, "rows": table}
    RESULTS.mkdir(exist_ok=True)
    name = "generators_quick.json" if args.quick else "generators.json"
    (RESULTS / name).write_text(json.dumps(result, indent=1))
    print(f"backend {result['backend']}; P block {rows}x{k} bf16; featurize MLP {widths}, "
          f"k={k}, batch {batch}")
    print(f"{'generator':>10} {'entries/s':>12} {'ratio':>6} {'featurize ex/s':>15} {'ratio':>6}")
    for row in table:
        print(f"{row['generator']:>10} {row['entries_per_s']:>12.3g} "
              f"{row['entries_ratio_to_hash']:>6.2f} {row['featurize_ex_per_s']:>15.1f} "
              f"{row['featurize_ratio_to_hash']:>6.2f}")


if __name__ == "__main__":
    main()
