"""Measure the torch->JAX converters (torchax, torch2jax, interop's own) for route 1.

For each converter: does it import cleanly with the pinned torch, which of interop's op
list it converts with the same outputs as torch (float32, rtol 1e-4), and the speed of
jit(vmap(grad(margin))) on a small CNN. Prints one JSON object; run:

    pip install torchax==0.0.13 torch2jax==0.1.0   # the `converters` extra
    PYTHONPATH=src python benchmarks/interop_converters.py
"""

import json
import sys
import time
import traceback
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

torch.manual_seed(0)


def op_cases():
    """name -> (module in eval mode, example input)."""
    x2 = torch.randn(4, 3, 8, 8)
    bn = nn.BatchNorm2d(3)
    bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    attn = Attention()
    return {
        "Linear": (nn.Linear(5, 3), torch.randn(4, 5)),
        "Conv1d": (nn.Conv1d(3, 4, 3, padding=1), torch.randn(4, 3, 10)),
        "Conv2d": (nn.Conv2d(3, 4, 3, padding=1, stride=2), x2),
        "BatchNorm2d(eval)": (bn, x2),
        "LayerNorm": (nn.LayerNorm(8), torch.randn(4, 6, 8)),
        "Embedding": (nn.Embedding(10, 4), torch.randint(0, 10, (4, 6))),
        "ReLU": (nn.ReLU(), torch.randn(4, 5)),
        "GELU": (nn.GELU(), torch.randn(4, 5)),
        "MaxPool2d": (nn.MaxPool2d(2), x2),
        "AvgPool2d": (nn.AvgPool2d(2), x2),
        "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d(1), x2),
        "Dropout(eval)": (nn.Dropout(0.5), torch.randn(4, 5)),
        "scaled_dot_product_attention": (attn, torch.randn(4, 6, 8)),
    }


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return nn.functional.scaled_dot_product_attention(q, k, v)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = nn.functional.relu(self.bn1(self.conv1(x)))  # torch2jax lacks torch.relu
        x = nn.functional.max_pool2d(x, 2)
        x = nn.functional.relu(self.conv2(x))
        return self.fc(self.pool(x).flatten(1))


def via_torchax(module):
    import torchax

    params, fn = torchax.extract_jax(module)
    return params, lambda p, x: fn(p, (x,))


def via_torch2jax(module):
    import torch2jax

    fn = torch2jax.t2j(module)
    params = {k: torch2jax.t2j(v) for k, v in module.state_dict().items()}
    return params, lambda p, x: fn(x, state_dict=p)


def via_interop(module):
    from trax_attr import interop

    apply = interop.convert(module)
    state = module.state_dict()
    params = {n: jnp.asarray(state[n].numpy()) for n, _ in module.named_parameters()}
    buffers = {n: jnp.asarray(b.numpy()) for n, b in module.named_buffers()
               if b.is_floating_point()}
    return params, lambda p, x: apply(p, buffers, x)


def to_jax(x):
    return jnp.asarray(x.numpy())


def measure(name, convert):
    out = {"converter": name}
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            __import__(name)
        except Exception as err:  # noqa: BLE001 - recorded, this is a survey
            out["import"] = f"fails: {type(err).__name__}: {err}"
            return out
    out["import_s"] = round(time.perf_counter() - t0, 2)
    out["import_warnings"] = sorted({f"{w.category.__name__}: {str(w.message)[:80]}"
                                     for w in caught})
    ops = {}
    for op, (module, x) in op_cases().items():
        module.eval()
        try:
            params, fn = convert(module)
            got = np.asarray(jax.jit(fn)(params, to_jax(x)))
            with torch.no_grad():
                want = module(x).numpy()
            err = float(np.max(np.abs(got - want)) / (np.max(np.abs(want)) + 1e-12))
            ops[op] = "ok" if err < 1e-4 else f"wrong (max rel err {err:.1e})"
        except Exception as err:  # noqa: BLE001
            first = str(err).splitlines()[0][:100] if str(err) else ""
            ops[op] = f"fails: {type(err).__name__}: {first}"
    out["ops"] = ops
    try:
        module = SmallCNN().eval()
        params, fn = convert(module)
        # differentiate the float leaves only (torch2jax also hands over BatchNorm's
        # integer num_batches_tracked)
        fixed = {k: v for k, v in params.items() if not jnp.issubdtype(v.dtype, jnp.floating)}
        params = {k: v for k, v in params.items() if k not in fixed}
        inner = fn
        fn = lambda p, xi: inner({**p, **fixed}, xi)  # noqa: E731
        x = jnp.asarray(np.random.default_rng(0).normal(size=(256, 1, 8, 8)).astype(np.float32))
        y = jnp.asarray(np.random.default_rng(1).integers(0, 10, 256))

        def margin(p, xi, yi):
            logits = fn(p, xi[None])[0]
            others = jnp.where(jnp.arange(10) == yi, -jnp.inf, logits)
            return logits[yi] - jax.nn.logsumexp(others)

        grads = jax.jit(jax.vmap(jax.grad(margin), in_axes=(None, 0, 0)))
        t0 = time.perf_counter()
        jax.block_until_ready(grads(params, x, y))
        out["cnn_compile_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        for _ in range(5):
            jax.block_until_ready(grads(params, x, y))
        out["cnn_per_example_grads_per_s"] = round(5 * 256 / (time.perf_counter() - t0))
    except Exception as err:  # noqa: BLE001
        out["cnn"] = f"fails: {type(err).__name__}: {err}"
        traceback.print_exc()
    return out


def main():
    results = [measure("torchax", via_torchax), measure("torch2jax", via_torch2jax),
               measure("interop", via_interop)]
    json.dump({"torch": torch.__version__, "jax": jax.__version__, "results": results},
              sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
