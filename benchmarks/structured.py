"""Featurize throughput and peak memory: dense vs Kronecker-structured projection at equal k.

Each (model, projector) runs in its own subprocess so that peak RSS (ru_maxrss) is its
own; the dense and structured runs of a model are measured back to back, and the table
reports their ratio (the CPU is shared, so ratios are steadier than absolute rates).

    PYTHONPATH=src python benchmarks/structured.py            # JSON to benchmarks/results/

Dense uses the library's fast path (bfloat16 Rademacher, float32 accumulation); the
structured projector runs in float32 with a bfloat16 dense fallback of 64 columns.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import time

CONFIGS = {
    # name: (kind, size args, batch, timed batches for dense, r)
    "mlp_10M": ("mlp", dict(width=2048, depth=3), 16, 2, 16),
    "transformer_10M": ("transformer", dict(dim=256, layers=12, seq=32), 8, 1, 4),
    "transformer_50M": ("transformer", dict(dim=512, layers=16, seq=32), 4, 1, 2),
}
FALLBACK = 64


def build(kind, args):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    if kind == "mlp":
        class MLP(nn.Module):
            @nn.compact
            def __call__(self, x):
                for _ in range(args["depth"]):
                    x = nn.relu(nn.Dense(args["width"])(x))
                return nn.Dense(10)(x)

        module, x = MLP(), jnp.ones((1, 784))
    else:
        dim, seq = args["dim"], args["seq"]

        class Block(nn.Module):
            @nn.compact
            def __call__(self, h):
                z = nn.LayerNorm()(h)
                q, k, v = (nn.Dense(dim)(z) for _ in range(3))
                heads = dim // 64
                split = lambda a: a.reshape(a.shape[:-1] + (heads, 64))
                w = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / 8.0
                a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(w, -1), split(v))
                h = h + nn.Dense(dim)(a.reshape(h.shape))
                z = nn.LayerNorm()(h)
                return h + nn.Dense(dim)(nn.gelu(nn.Dense(4 * dim)(z)))

        class Transformer(nn.Module):
            @nn.compact
            def __call__(self, tokens):
                h = nn.Embed(256, dim)(tokens)
                h = h + self.param("pos", nn.initializers.normal(0.02), (seq, dim))
                for _ in range(args["layers"]):
                    h = Block()(h)
                return nn.Dense(10)(nn.LayerNorm()(h).mean(axis=1))

        module, x = Transformer(), jnp.ones((1, seq), jnp.int32)
    return module, module.init(jax.random.key(0), x), x


def child(name, mode):
    import jax
    import jax.numpy as jnp
    import numpy as np

    import trax_attr
    from trax_attr.engine import Checkpoint, Featurizer, features
    from trax_attr.gradients import select
    from trax_attr.projection import projection_key
    from trax_attr.tasks import get_task

    kind, args, batch, timed, r = CONFIGS[name]
    module, variables, x1 = build(kind, args)
    model = trax_attr.as_model(module)
    params, state = model.split(variables)
    selection = select(params)
    selected, rest = selection.split(params)
    structured = trax_attr.kronecker(r, r, fallback_dim=FALLBACK, dtype=jnp.float32,)
    structured = dataclasses.replace(structured, fallback=trax_attr.rademacher(FALLBACK, max_cache_bytes=0))
    rng = np.random.default_rng(0)
    if kind == "mlp":
        xb = jnp.asarray(rng.normal(size=(batch, 784)), jnp.float32)
    else:
        xb = jnp.asarray(rng.integers(0, 256, size=(batch, args["seq"])), jnp.int32)
    yb = jnp.asarray(rng.integers(0, 10, size=batch), jnp.int32)
    key = projection_key(0, 0)
    task = get_task("image_classification")
    def featurizer(projector):
        f = Featurizer(task, model, selection, projector)
        return jax.jit(lambda ckpt, batch: features(f, ckpt, batch)[0])

    ckpt = Checkpoint(selected, rest, state, key, None)
    fs = featurizer(structured)
    k = int(jax.eval_shape(fs, ckpt, (xb, yb)).shape[1])
    if mode == "structured":
        fn, repeats = fs, 3
    else:
        # equal k; the P of a 10M+ model never fits the cache, so it is regenerated
        dense = trax_attr.rademacher(k)
        fn = featurizer(dense)
        repeats = timed
    jax.block_until_ready(fn(ckpt, (xb, yb)))  # compile
    t0 = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(ckpt, (xb, yb)))
    dt = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB on Linux
    print(json.dumps({"model": name, "mode": mode, "params": selection.grad_dim, "k": k,
                      "batch": batch, "repeats": repeats,
                      "examples_per_s": batch * repeats / dt, "peak_rss_mib": rss}))


def main():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    rows = []
    for name in CONFIGS:
        for mode in ("structured", "dense"):
            out = subprocess.run([sys.executable, __file__, "--child", name, mode], env=env,
                                 capture_output=True, text=True, timeout=600)
            if out.returncode:
                raise RuntimeError(out.stderr[-3000:])
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    table = []
    for name in CONFIGS:
        s, d = [next(r for r in rows if r["model"] == name and r["mode"] == m)
                for m in ("structured", "dense")]
        table.append({"model": name, "params": s["params"], "k": s["k"],
                      "dense_ex_s": d["examples_per_s"], "structured_ex_s": s["examples_per_s"],
                      "speedup": s["examples_per_s"] / d["examples_per_s"],
                      "dense_rss_mib": d["peak_rss_mib"],
                      "structured_rss_mib": s["peak_rss_mib"]})
    print(f"{'model':16} {'params':>10} {'k':>6} {'dense ex/s':>11} {'struct ex/s':>12} "
          f"{'speedup':>8} {'dense MiB':>10} {'struct MiB':>11}")
    for t in table:
        print(f"{t['model']:16} {t['params']:>10,} {t['k']:>6} {t['dense_ex_s']:>11.2f} "
              f"{t['structured_ex_s']:>12.1f} {t['speedup']:>7.1f}x {t['dense_rss_mib']:>10.0f} "
              f"{t['structured_rss_mib']:>11.0f}")
    path = os.path.join(os.path.dirname(__file__), "results", "structured.json")
    with open(path, "w") as fh:
        json.dump({"rows": rows, "table": table}, fh, indent=1)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    else:
        main()
