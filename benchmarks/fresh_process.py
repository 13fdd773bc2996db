"""The whole run in a fresh process, trax_attr against traker 0.3.2, phase by phase.

    PYTHONPATH=src python benchmarks/fresh_process.py                 # n 1k, 5k; M 1, k 512
    PYTHONPATH=src python benchmarks/fresh_process.py --sizes 1000 5000 20000 --mk 1:512 5:2048
    PYTHONPATH=src python benchmarks/fresh_process.py --quick         # the smoke test
    PYTHONPATH=src python benchmarks/fresh_process.py --sizes 1000 --baseline ../main/src

Every run is a new Python process (imports, JAX compiles and traker's set-up included)
that featurizes n training rows (batches of 256) of an MLP 64-256-256-10 (d = 85,002) for M
checkpoints, then finalize_features, then scores 500 targets per checkpoint (score), then
finalize_scores. The two libraries alternate (ours, traker, ours, ...) and each phase's best
of the repeats is reported, with the ratio traker / ours. traker 0.3.2 runs its own CPU
BasicProjector in float32 (its default on CPU), torch on 2 threads.

In the same run, a "rates" process measures this machine's compute bounds at the shape:
the f32 and bf16 dot (256, 8192) x (8192, k), XᵀX of (4096, k) f32 and the float64 inverse
of (k, k) (engine.linalg.inverse_gram). The bound of each phase is its minimal work at
those rates: featurize 2·n·d·k·M at the faster dot, finalize_features n·k²·M at the XᵀX
rate plus M inverses, score 2·500·d·k·M, finalize_scores 2·n·k·500·M (+ k²·500·M) at the
f32 dot. JSON to benchmarks/results/fresh_process.json (fresh_process_quick.json).

``--baseline SRC`` runs a third child in the same alternation: trax_attr imported from
another source tree (e.g. main's ``src`` before a change), so that before and after are
measured side by side under the same load.

Beyond the phases: "import" (flax and trax_attr; torch and trak), "setup" (the data and
the M checkpoints: flax's eager init, torch's modules) and "process", the whole child as
timed by the parent (interpreter start-up included).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LIBRARIES = ("trax_attr", "traker 0.3.2")
PHASES = ("featurize", "finalize_features", "score", "finalize_scores")
OUTSIDE = ("import", "setup", "process_s")  # the process beyond the phases
BASELINE = "trax_attr baseline"  # trax_attr from --baseline's source tree
BATCH, WIDTHS = 256, (64, 256, 256, 10)


def grad_dim(widths=WIDTHS) -> int:
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


def data(n: int, targets: int, inputs: int):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n + targets, inputs), dtype=np.float32)
    y = rng.integers(0, 10, n + targets).astype(np.int32)
    return (x[:n], y[:n]), (x[n:], y[n:])


def run_ours(n, models, k, targets, widths):
    t0 = time.perf_counter()
    import flax.linen as nn
    import jax

    import trax_attr
    imported = time.perf_counter()

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for w in widths[1:-1]:
                x = nn.relu(nn.Dense(w)(x))
            return nn.Dense(widths[-1])(x)

    (x, y), (tx, ty) = data(n, targets, widths[0])
    ckpts = [MLP().init(jax.random.key(m), x[:1]) for m in range(models)]
    times = dict.fromkeys(PHASES, 0.0)
    times["import"], times["setup"] = imported - t0, time.perf_counter() - imported
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        traker = trax_attr.TRAKer(model=MLP(), task="image_classification",
                                  train_set_size=n, save_dir=tmp, proj_dim=k)
        for m, ckpt in enumerate(ckpts):
            traker.load_checkpoint(ckpt, model_id=m)
            for s in range(0, n, BATCH):
                traker.featurize((x[s:s + BATCH], y[s:s + BATCH]),
                                 num_samples=len(x[s:s + BATCH]))
        times["featurize"] = time.perf_counter() - start
        t0 = time.perf_counter()
        traker.finalize_features()
        times["finalize_features"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for m, ckpt in enumerate(ckpts):
            traker.start_scoring_checkpoint("t", ckpt, model_id=m, num_targets=targets)
            for s in range(0, targets, BATCH):
                traker.score((tx[s:s + BATCH], ty[s:s + BATCH]),
                             num_samples=len(tx[s:s + BATCH]))
        times["score"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        scores = np.asarray(traker.finalize_scores("t"))
        times["finalize_scores"] = time.perf_counter() - t0
    return times, scores


def run_traker(n, models, k, targets, widths):
    t0 = time.perf_counter()
    import torch
    import trak
    from trak.projectors import BasicProjector, ProjectionType
    imported = time.perf_counter()

    torch.set_num_threads(2)
    (x, y), (tx, ty) = data(n, targets, widths[0])
    x, y, tx, ty = (torch.from_numpy(a) for a in (x, y.astype(np.int64), tx,
                                                   ty.astype(np.int64)))
    def mlp(seed):
        torch.manual_seed(seed)
        layers = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        return torch.nn.Sequential(*layers[:-1]).eval()

    model = mlp(0)
    ckpts = [mlp(m).state_dict() for m in range(models)]
    times = dict.fromkeys(PHASES, 0.0)
    times["import"], times["setup"] = imported - t0, time.perf_counter() - imported
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        projector = BasicProjector(grad_dim=grad_dim(widths), proj_dim=k, seed=0,
                                   proj_type=ProjectionType.rademacher, device="cpu",
                                   dtype=torch.float32)
        traker = trak.TRAKer(model=model, task="image_classification", train_set_size=n,
                             save_dir=tmp, device="cpu", use_half_precision=False,
                             proj_dim=k, projector=projector, logging_level=logging.ERROR)
        for m, ckpt in enumerate(ckpts):
            traker.load_checkpoint(ckpt, model_id=m)
            for s in range(0, n, BATCH):
                traker.featurize(batch=(x[s:s + BATCH], y[s:s + BATCH]),
                                 num_samples=len(x[s:s + BATCH]))
        times["featurize"] = time.perf_counter() - start
        t0 = time.perf_counter()
        traker.finalize_features()
        times["finalize_features"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for m, ckpt in enumerate(ckpts):
            traker.start_scoring_checkpoint(exp_name="t", checkpoint=ckpt, model_id=m,
                                            num_targets=targets)
            for s in range(0, targets, BATCH):
                traker.score(batch=(tx[s:s + BATCH], ty[s:s + BATCH]),
                             num_samples=len(tx[s:s + BATCH]))
        times["score"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        scores = np.asarray(traker.finalize_scores(exp_name="t"))
        times["finalize_scores"] = time.perf_counter() - t0
    return times, scores


def best_of(fn, repeats=5) -> float:
    fn()  # compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def rates(k: int, contraction: int = 8192, gram_rows: int = 4096) -> dict:
    """This machine's rates at the benchmark's shapes (FLOP/s; the inverse in seconds)."""
    import jax
    import jax.numpy as jnp

    from trax_attr.engine import inverse_gram

    rng = np.random.default_rng(0)
    out = {}
    for dtype in ("float32", "bfloat16"):
        a = jnp.asarray(rng.standard_normal((BATCH, contraction), np.float32), dtype)
        b = jnp.asarray(rng.standard_normal((contraction, k), np.float32), dtype)
        dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
        out[f"dot_{dtype}_flops"] = 2 * BATCH * contraction * k / best_of(
            lambda: dot(a, b).block_until_ready())
    x = jnp.asarray(rng.standard_normal((gram_rows, k), np.float32))
    gram = jax.jit(lambda x: x.T @ x)
    out["xtx_flops"] = gram_rows * k * k / best_of(lambda: gram(x).block_until_ready())
    g = np.asarray(gram(x), np.float64)
    out["inverse_s"] = best_of(lambda: inverse_gram(g, float(np.trace(g) / k)), 3)
    return out


def bounds(n, models, k, targets, d, r) -> dict:
    dot = max(r["dot_float32_flops"], r["dot_bfloat16_flops"])
    return {"featurize": 2 * n * d * k * models / dot,
            "finalize_features": models * (n * k * k / r["xtx_flops"] + r["inverse_s"]),
            "score": 2 * targets * d * k * models / dot,
            "finalize_scores": models * (2 * n * k * targets + k * k * targets)
            / r["dot_float32_flops"]}


def child(args) -> dict:
    if args.child == "rates":
        return rates(args.k)
    fn = run_ours if args.child == "trax_attr" else run_traker
    times, scores = fn(args.n, args.m, args.k, args.targets, WIDTHS)
    assert scores.shape == (args.n, args.targets) and np.isfinite(scores).all()
    return times


def spawn(kind: str, n: int, m: int, k: int, targets: int, src: str | None = None
          ) -> tuple[dict, float]:
    env = None if src is None else {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child",
                           "trax_attr" if kind == BASELINE else kind, "--n", str(n),
                           "--m", str(m), "--k", str(k), "--targets", str(targets)],
                          check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1]), time.perf_counter() - t0


def measure(n, m, k, targets, repeats, baseline: str | None = None) -> dict:
    libs = LIBRARIES + ((BASELINE,) if baseline else ())
    runs = {lib: [] for lib in libs}
    machine = []
    for _ in range(repeats):  # alternating: a drift of the machine's speed hits all
        for lib in libs:
            times, wall = spawn(lib, n, m, k, targets, baseline if lib == BASELINE else None)
            runs[lib].append({**times, "process_s": wall})
        machine.append(spawn("rates", n, m, k, targets)[0])
    r = {key: max(x[key] for x in machine) if key != "inverse_s"
         else min(x[key] for x in machine) for key in machine[0]}
    best = {lib: {p: min(x[p] for x in runs[lib]) for p in PHASES + OUTSIDE}
            for lib in libs}
    for lib in libs:
        best[lib]["total"] = min(sum(x[p] for p in PHASES) for x in runs[lib])
    bound = bounds(n, m, k, targets, grad_dim(), r)
    ours, ref = best["trax_attr"], best["traker 0.3.2"]
    keys = PHASES + ("total",) + OUTSIDE
    out = {"n_train": n, "models": m, "proj_dim": k, "targets": targets, "d": grad_dim(),
           "repeats": repeats, "rates": r, "bound_s": bound, "best_s": best, "runs": runs,
           "ratio_traker_over_ours": {p: ref[p] / ours[p] for p in keys},
           "ours_fraction_of_bound": {p: bound[p] / ours[p] for p in PHASES}}
    if baseline:
        out["baseline_src"] = str(Path(baseline).resolve())
        out["ratio_baseline_over_ours"] = {p: best[BASELINE][p] / ours[p] for p in keys}
    return out


def table(rows, lib: str = "trax_attr") -> str:
    """The rows of ``lib`` (trax_attr, or the baseline) against traker."""
    lines = ["| n, M, k | " + " | ".join(f"{p} ours / traker (bound)" for p in PHASES)
             + " | total ours / traker (x) | import, setup ours / traker"
             " | process ours / traker (x) |",
             "|---" * (len(PHASES) + 4) + "|"]
    for r in rows:
        o, t, b = r["best_s"][lib], r["best_s"]["traker 0.3.2"], r["bound_s"]
        x = {p: t[p] / o[p] for p in PHASES + ("total",) + OUTSIDE}
        cells = [f"{o[p]:.2f} / {t[p]:.2f} ({b[p]:.2f})" for p in PHASES]
        lines.append(f"| {r['n_train']}, {r['models']}, {r['proj_dim']} | "
                     + " | ".join(cells)
                     + f" | {o['total']:.2f} / {t['total']:.2f} ({x['total']:.2f}x)"
                     + f" | {o['import']:.2f}, {o['setup']:.2f} / {t['import']:.2f}, "
                       f"{t['setup']:.2f}"
                     + f" | {o['process_s']:.2f} / {t['process_s']:.2f} ({x['process_s']:.2f}x) |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    ap.add_argument("--mk", nargs="+", default=["1:512"],
                    help="checkpoints M and proj_dim k, as M:k")
    ap.add_argument("--targets", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline", metavar="SRC",
                    help="another trax_attr source tree (its src folder) run alongside")
    ap.add_argument("--child", choices=LIBRARIES + ("rates",))
    ap.add_argument("--n", type=int)
    ap.add_argument("--m", type=int)
    ap.add_argument("--k", type=int)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.quick:
        args.sizes, args.mk, args.targets, args.repeats = [300], ["1:128"], 50, 1  # k > 100: traker's one-block projector fails at score
    configs = [(n, *map(int, mk.split(":"))) for mk in args.mk for n in args.sizes]
    rows = []
    for n, m, k in configs:
        rows.append(measure(n, m, k, args.targets, args.repeats, args.baseline))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        if args.baseline:
            print("baseline " + table(rows[-1:], BASELINE).splitlines()[-1], flush=True)
    path = RESULTS / ("fresh_process_quick.json" if args.quick else "fresh_process.json")
    path.write_text(json.dumps({
        "machine": f"{platform.machine()}, {platform.processor() or '?'}",
        "command": "python benchmarks/fresh_process.py " + " ".join(sys.argv[1:]),
        "rows": rows}, indent=1))
    print(f"\nwhole run in a fresh process, MLP {'-'.join(map(str, WIDTHS))} "
          f"(d = {grad_dim()}), {args.targets} targets, batch {BATCH}, best of "
          f"{args.repeats}; seconds; bound: this machine's rates measured in the same run")
    print(table(rows))
    if args.baseline:
        print(f"\nthe baseline, trax_attr from {args.baseline}, in the same alternation:")
        print(table(rows, BASELINE))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
