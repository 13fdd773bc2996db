"""Featurize throughput on this process's first device against its own bf16 matmul rate.

    PYTHONPATH=src python benchmarks/device_featurize.py            # GPU sizes (< 5 min)
    PYTHONPATH=src python benchmarks/device_featurize.py --small    # a CPU check, tiny sizes

Two models, random init (no downloads), TRAKer defaults (bfloat16 Rademacher projection,
P regenerated per batch when it does not fit the projector's cache budget):

* a wide MLP 784-2048-2048-2048-10 (d = 10.0M), batch 256;
* ResNet-18 (the torchvision layout: 64-128-256-512 basic blocks, BatchNorm in inference
  mode, written in flax.linen) on 3 x 32 x 32 images (d = 11.2M), batch 128.

For each: the first batch (compiles included), then the steady examples/s over the timed
batches, and the compute bound of the projection alone, 2·d·k FLOPs per example at the
device's bf16 dot rate measured here at (batch, 8192) x (8192, k); ``fraction_of_bound``
is the bound's time over the measured time (1.0 = featurize at the matmul rate; the
per-example gradients come on top). JSON to ``$OUT/device_featurize.json`` when ``$OUT``
is set, else benchmarks/results/device_featurize[_small].json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import trax_attr

FULL = {"mlp": dict(widths=(784, 2048, 2048, 2048, 10), batch=256),
        "resnet18": dict(stages=(64, 128, 256, 512), image=32, batch=128),
        "proj_dim": 2048, "batches": 6}
SMALL = {"mlp": dict(widths=(64, 128, 128, 10), batch=16),
         "resnet18": dict(stages=(8, 8, 16, 16), image=16, batch=4),
         "proj_dim": 128, "batches": 3}


class MLP(nn.Module):
    widths: tuple

    @nn.compact
    def __call__(self, x):
        for w in self.widths[1:-1]:
            x = nn.relu(nn.Dense(w)(x))
        return nn.Dense(self.widths[-1])(x)


class Block(nn.Module):
    features: int
    stride: int

    @nn.compact
    def __call__(self, x):
        norm = lambda: nn.BatchNorm(use_running_average=True)
        y = nn.Conv(self.features, (3, 3), self.stride, padding=1, use_bias=False)(x)
        y = nn.relu(norm()(y))
        y = norm()(nn.Conv(self.features, (3, 3), padding=1, use_bias=False)(y))
        if self.stride != 1 or x.shape[-1] != self.features:
            x = norm()(nn.Conv(self.features, (1, 1), self.stride, use_bias=False)(x))
        return nn.relu(x + y)


class ResNet18(nn.Module):
    """torchvision's resnet18 layout (two basic blocks per stage), NHWC inputs."""
    stages: tuple = (64, 128, 256, 512)

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.stages[0], (7, 7), 2, padding=3, use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=True)(x))
        x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
        for i, features in enumerate(self.stages):
            x = Block(features, 1 if i == 0 else 2)(x)
            x = Block(features, 1)(x)
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def bf16_rate(batch: int, k: int, contraction: int = 8192) -> float:
    """FLOP/s of the device's bf16 dot (batch, contraction) x (contraction, k), f32 out."""
    a = jnp.ones((batch, contraction), jnp.bfloat16)
    b = jnp.ones((contraction, k), jnp.bfloat16)
    dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    dot(a, b).block_until_ready()
    reps, best = 20, float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = dot(a, b)
        out.block_until_ready()
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * batch * contraction * k / best


def featurize(name: str, cfg: dict, k: int, batches: int) -> dict:
    rng = np.random.default_rng(0)
    batch = cfg["batch"]
    if name == "mlp":
        module = MLP(cfg["widths"])
        x = rng.standard_normal((batch * batches, cfg["widths"][0]), np.float32)
    else:
        module = ResNet18(cfg["stages"])
        x = rng.standard_normal((batch * batches, cfg["image"], cfg["image"], 3), np.float32)
    y = rng.integers(0, 10, len(x)).astype(np.int32)
    variables = jax.jit(module.init)(jax.random.key(0), x[:1])  # one compile, not dozens
    d = sum(int(np.size(p)) for p in jax.tree.leaves(variables["params"]))
    with tempfile.TemporaryDirectory() as tmp:
        traker = trax_attr.TRAKer(model=module, task="image_classification",
                                  train_set_size=len(x), save_dir=tmp, proj_dim=k)
        traker.load_checkpoint(variables, model_id=0)
        times = []
        for s in range(0, len(x), batch):
            t0 = time.perf_counter()
            traker.featurize((x[s:s + batch], y[s:s + batch]), num_samples=batch)
            times.append(time.perf_counter() - t0)
    steady = float(np.median(times[1:]))
    rate = bf16_rate(batch, k)
    bound = 2 * d * k * batch / rate
    return {"model": name, "d": d, "proj_dim": k, "batch": batch, "batches": batches,
            "first_batch_s": times[0], "steady_batch_s": steady,
            "examples_per_s": batch / steady, "bf16_dot_flops": rate,
            "projection_bound_batch_s": bound, "fraction_of_bound": bound / steady}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny sizes: a CPU check")
    ap.add_argument("--models", nargs="+", default=["mlp", "resnet18"])
    args = ap.parse_args(argv)
    cfg = SMALL if args.small else FULL
    device = jax.devices()[0]
    rows = []
    for name in args.models:
        rows.append(featurize(name, cfg[name], cfg["proj_dim"], cfg["batches"]))
        r = rows[-1]
        print(f"{name:9} d={r['d']:>10,} k={r['proj_dim']} batch={r['batch']}: first batch "
              f"{r['first_batch_s']:.2f} s, steady {r['examples_per_s']:.1f} ex/s, bf16 dot "
              f"{r['bf16_dot_flops'] / 1e9:.1f} GFLOP/s, projection bound "
              f"{r['projection_bound_batch_s'] * 1e3:.1f} ms/batch, at "
              f"{100 * r['fraction_of_bound']:.0f}% of it", flush=True)
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else (
        Path(__file__).parent / "results")
    path = out / ("device_featurize_small.json" if args.small else "device_featurize.json")
    path.write_text(json.dumps({"device": f"{device.platform}: {device.device_kind}",
                                "jax": jax.__version__, "small": args.small, "rows": rows},
                               indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
