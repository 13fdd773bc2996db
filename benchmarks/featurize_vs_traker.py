"""Featurize throughput: traker 0.3.2 against trax_attr's three routes, side by side.

The same torch MLPs on scikit-learn's digits, the same proj_dim, one process, each
library through its own TRAKer (store writes included): traker 0.3.2 on the CPU (its
BasicProjector, rademacher, float32, torch with 2 threads), and trax_attr with the Flax
twin, the converted torch module (backend="converted") and torch.func gradients
(backend="torch"), all with the default bfloat16 projection. Examples/s after a warm-up
batch, best of the timed passes; ratios are to traker measured in the same run.

    python benchmarks/featurize_vs_traker.py [--quick]

Writes benchmarks/results/featurize_vs_traker.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch
from flax import nnx

import trax_attr


class TorchMLP(torch.nn.Module):
    def __init__(self, widths):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)


class NnxMLP(nnx.Module):
    def __init__(self, widths, rngs):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs)
                                for a, b in zip(widths[:-1], widths[1:])])

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


def timed_featurize(make_traker, checkpoint, batches):
    """Examples/s of featurize over ``batches[1:]`` (batch 0 warms up)."""
    with tempfile.TemporaryDirectory() as folder:
        traker = make_traker(folder)
        traker.load_checkpoint(checkpoint, model_id=0)
        traker.featurize(batch=batches[0], num_samples=len(batches[0][0]))
        start = time.perf_counter()
        for batch in batches[1:]:
            traker.featurize(batch=batch, num_samples=len(batch[0]))
        seconds = time.perf_counter() - start
    return sum(len(b[0]) for b in batches[1:]) / seconds


def measure(name, widths, k, batch_size, num_batches, repeats):
    from sklearn.datasets import load_digits

    import trak
    from trak.projectors import BasicProjector, ProjectionType

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    n = batch_size * num_batches
    x, y = np.resize(x, (n, 64)), np.resize(y, n)
    torch_batches = [(torch.from_numpy(x[i:i + batch_size]), torch.from_numpy(y[i:i + batch_size]))
                     for i in range(0, n, batch_size)]
    np_batches = [(x[i:i + batch_size], y[i:i + batch_size].astype(np.int32))
                  for i in range(0, n, batch_size)]
    torch.manual_seed(0)
    module = TorchMLP(widths).eval()
    state_dict = module.state_dict()
    twin = NnxMLP(widths, nnx.Rngs(0))
    d = sum(p.numel() for p in module.parameters())

    def reference(folder):
        projector = BasicProjector(grad_dim=d, proj_dim=k, seed=0,
                                   proj_type=ProjectionType.rademacher, device="cpu",
                                   dtype=torch.float32)
        return trak.TRAKer(model=module, task="image_classification", train_set_size=n,
                           save_dir=folder, device="cpu", use_half_precision=False,
                           proj_dim=k, projector=projector, logging_level=40)

    def ours(folder, model=None, **kwargs):
        return trax_attr.TRAKer(model=model, task="image_classification", train_set_size=n,
                                save_dir=folder, proj_dim=k, **kwargs)

    routes = {
        "traker 0.3.2": (reference, state_dict, torch_batches),
        "trax_attr, Flax twin": (lambda f: ours(f, twin), None, np_batches),
        "trax_attr, converted torch": (lambda f: ours(f, module, backend="converted"),
                                       state_dict, np_batches),
        "trax_attr, torch.func": (lambda f: ours(f, module, backend="torch"), state_dict,
                                  np_batches),
    }
    rates = {label: max(timed_featurize(make, ckpt, batches) for _ in range(repeats))
             for label, (make, ckpt, batches) in routes.items()}
    base = rates["traker 0.3.2"]
    return [{"model": name, "d": int(d), "k": k, "batch": batch_size, "route": label,
             "examples_per_s": rate, "ratio_to_traker": rate / base,
             "projection_gflops": 2 * d * k * rate / 1e9} for label, rate in rates.items()]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.quick:
        cases = [("mlp 64-16-10", (64, 16, 10), 32, 16, 3, 1)]
    else:
        cases = [("mlp 64-128-10", (64, 128, 10), 512, 256, 8, 2),
                 ("mlp 64-1024-1024-10", (64, 1024, 1024, 10), 2048, 32, 4, 1)]
    rows = [row for case in cases for row in measure(*case)]
    name = "featurize_vs_traker_quick.json" if args.quick else "featurize_vs_traker.json"
    path = Path(__file__).parent / "results" / name
    path.write_text(json.dumps({
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                   f"jax {jax.__version__} on {jax.devices()[0].platform}",
        "command": "python benchmarks/featurize_vs_traker.py", "rows": rows}, indent=1))
    print(f"{'model':22} {'route':28} {'ex/s':>10} {'x traker':>9} {'GFLOP/s':>8}")
    for r in rows:
        print(f"{r['model']:22} {r['route']:28} {r['examples_per_s']:10.1f} "
              f"{r['ratio_to_traker']:9.2f} {r['projection_gflops']:8.1f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
