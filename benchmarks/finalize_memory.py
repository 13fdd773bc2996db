"""Peak memory per host of finalize_features and finalize_scores against proj_dim k.

    python benchmarks/finalize_memory.py                       # k = 4k, 8k, 16k, 32k
    python benchmarks/finalize_memory.py --ks 4096 8192 --n 512
    python benchmarks/finalize_memory.py --baseline-src /path/to/other/checkout/src
    python benchmarks/finalize_memory.py --measure-up-to 11585 --merge a.json b.json

Each (k, solve) point runs in a fresh subprocess on 8 simulated CPU devices
(JAX_NUM_CPU_DEVICES=8, XLA_FLAGS=--xla_force_host_platform_device_count=8), so that its peak is its own. "host" is the float64 host solve
(today's layout: XᵀX psum'd on every device, then float64 copies on the host); "sharded"
is XᵀX and its inverse split by rows over the 8 devices (float32 Gauss-Jordan). Only k
matters, so n is small (synthetic rows written straight into the store; λ = "auto").

Measured: the process's resident memory (RSS, sampled every 5 ms, minus its value before
finalize), which on simulated CPU devices holds the devices' buffers too; and the
per-device estimate of XLA (``compiled.memory_analysis()``: arguments + outputs + temps −
aliased) for the largest kernel of the step. Points whose predicted peak exceeds the
memory available, or whose k is above ``--measure-up-to`` (the sharded float32
Gauss-Jordan costs 2 k³ flops: minutes per point on a few CPU cores), are not run: their
RSS is extrapolated from the measured points of the same solve (a least-squares fit of
RSS = a + b·k², marked "extrapolated"), and their per-device bytes are still XLA's
(compiled, not run). ``--merge`` starts from the measured rows of earlier JSON files (two
runs side by side). JSON in benchmarks/results/finalize_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEVICES = 8
GIB = 1 << 30


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Peak:
    """The largest RSS seen since :meth:`reset`, sampled by a thread."""

    def __init__(self, every=0.005):
        self.value, self._stop = _rss(), False
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every):
        while not self._stop:
            self.value = max(self.value, _rss())
            time.sleep(every)

    def reset(self) -> int:
        self.value = _rss()
        return self.value

    def read(self) -> int:
        self.value = max(self.value, _rss())
        return self.value


def _device_bytes(compiled) -> int:
    stats = compiled.memory_analysis()
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
               + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def _device_estimate(k: int, solve: str, chunk: int) -> int:
    """XLA's bytes per device for the biggest kernel of finalize_features."""
    import jax
    import jax.numpy as jnp

    from trax_attr import parallel
    from trax_attr.parallel import solve as sharded

    mesh = parallel.default_mesh()
    if solve == "host":
        x = jax.ShapeDtypeStruct((parallel.round_up(chunk, mesh.size), k), jnp.float32)
        return _device_bytes(parallel.gram.lower(x, mesh).compile())
    smesh = sharded.solve_mesh(mesh)
    lay = sharded.layout(k, smesh.size)
    acc = jax.ShapeDtypeStruct((lay.padded, lay.padded), jnp.float32,
                               sharding=jax.NamedSharding(smesh, sharded._ROWS))
    x = jax.ShapeDtypeStruct((parallel.round_up(chunk, smesh.size), k), jnp.float32,
                             sharding=jax.NamedSharding(smesh, sharded._ROWS))
    return max(_device_bytes(sharded.accumulate.lower(acc, x, smesh, lay).compile()),
               _device_bytes(sharded.invert.lower(acc, smesh, lay).compile()))


def point(k: int, solve: str, n: int, m: int, save_dir: str) -> dict:
    """One (k, solve) point in this process: a store of n synthetic rows, then
    finalize_features and finalize_scores, each with its own peak."""
    import inspect

    import jax

    from trax_attr import parallel, pipeline
    from trax_attr.store import Store, write_rows

    assert jax.device_count() == DEVICES, jax.devices()
    peak = Peak()
    store = Store(save_dir, {})
    store.create_model(0, "synthetic")
    del store.model_arrays(0, n, k)["grads"]
    rng = np.random.default_rng(0)
    chunk = pipeline.chunk_rows(k)
    for start in range(0, n, chunk):
        c = min(chunk, n - start)
        write_rows(store.array_path(0, "grads"), start, rng.standard_normal((c, k), np.float32))
        write_rows(store.array_path(0, "out_to_loss"), start,
                   rng.uniform(0, 1, c).astype(np.float32))
        write_rows(store.array_path(0, "done"), start, np.ones(c, np.uint8))
    store.add_to_experiment("bench", 0, m)
    targets = store.target_arrays("bench", 0, m, k)
    targets["grads"][:] = rng.standard_normal((m, k), np.float32)
    targets["done"][:] = 1
    targets["grads"].flush(), targets["done"].flush()
    del targets
    mesh = parallel.default_mesh()
    kwargs = {"solve": solve} if "solve" in inspect.signature(
        pipeline.finalize_features).parameters else {}
    if not kwargs and solve != "host":
        raise SystemExit("this checkout has no sharded solve")

    base = peak.reset()
    t0 = time.perf_counter()
    pipeline.finalize_features(store, [0], n=n, k=k, lambda_reg="auto", rescale=False,
                               xtx_dtype=np.float32, chunk=chunk, mesh=mesh, **kwargs)
    t_features = time.perf_counter() - t0
    features = peak.read() - base

    base_scores = peak.reset()
    t0 = time.perf_counter()
    with store.experiment_lock("bench", shared=False, doing="bench"):
        pipeline.finalize_scores(store, "bench", None, allow_skip=False, n=n, k=k,
                                 chunk=pipeline.chunk_rows(k), mesh=mesh, top_k=None,
                                 target_chunk=4096)
    t_scores = time.perf_counter() - t0
    scores = peak.read() - base_scores
    return {"k": k, "solve": solve, "n": n, "m": m, "devices": jax.device_count(),
            "rss_before_bytes": base, "features_rss_bytes": features,
            "features_seconds": round(t_features, 1), "scores_rss_bytes": scores,
            "scores_seconds": round(t_scores, 1),
            "device_bytes_per_device": _device_estimate(k, solve, chunk),
            "extrapolated": False}


def _available() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _predict(k: int, solve: str, measured: list[dict]) -> float:
    """Peak RSS of a point: a k² fit of the measured points of that solve, or the layout's
    count of k x k float32 copies (host: 4 per device + 1 + 9 host copies of 4-8 bytes)."""
    done = [r for r in measured if r["solve"] == solve and not r["extrapolated"]]
    if len(done) >= 2:
        a, b = _fit(done)
        return a + b * k * k
    per_entry = 4 * (DEVICES + 1) + 40 if solve == "host" else 12
    return per_entry * k * k


def _fit(rows: list[dict]) -> tuple[float, float]:
    ks = np.array([r["k"] for r in rows], np.float64)
    peaks = np.array([r["features_rss_bytes"] for r in rows], np.float64)
    b, a = np.polyfit(ks ** 2, peaks, 1)
    return a, b


def _rows_of(path: Path) -> list[dict]:
    """The rows of an earlier run: its JSON, or the RESULT lines a ``--point`` printed."""
    text = path.read_text()
    if text.lstrip().startswith("{"):
        return json.loads(text)["rows"]
    rows = [dict(json.loads(line[len("RESULT "):]), source="this checkout")
            for line in text.splitlines() if line.startswith("RESULT ")]
    return rows


def _table(rows: list[dict]) -> str:
    lines = [f"{'k':>6} {'solve':>8} {'features RSS':>13} {'scores RSS':>11} "
             f"{'device/device':>14} {'features s':>11} {'vs host':>8}"]
    host = {r["k"]: r["features_rss_bytes"] for r in rows if r["solve"] == "host"}
    for r in sorted(rows, key=lambda r: (r["k"], r["solve"])):
        mark = "*" if r["extrapolated"] else " "
        ratio = (f"{r['features_rss_bytes'] / host[r['k']]:.2f}" if r["k"] in host
                 and r["solve"] == "sharded" else "")
        scores = f"{r['scores_rss_bytes'] / GIB:.2f} GiB" if r.get("scores_rss_bytes") \
            is not None else "-"
        device = f"{r['device_bytes_per_device'] / GIB:.2f} GiB" \
            if r.get("device_bytes_per_device") is not None else "-"
        seconds = f"{r['features_seconds']:.0f}" if r.get("features_seconds") is not None \
            else "-"
        lines.append(f"{r['k']:>6} {r['solve']:>8} {r['features_rss_bytes'] / GIB:>8.2f} GiB{mark}"
                     f" {scores:>11} {device:>14} {seconds:>11} {ratio:>8}")
    lines.append("RSS: peak resident memory of the process during the step minus before it "
                 "(holds the 8 simulated devices' buffers); * extrapolated (k² fit of the "
                 "measured points of that solve); device/device: XLA's bytes per device of "
                 "the largest kernel (compiled, also for * rows)")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--host-ks", type=int, nargs="+", default=None,
                        help="k of the host solve points (default: --ks plus 11,585)")
    parser.add_argument("--n", type=int, default=1024, help="training rows")
    parser.add_argument("--m", type=int, default=16, help="targets")
    parser.add_argument("--baseline-src", default=None,
                        help="src/ of another checkout for the host points (e.g. before "
                             "the sharded solve)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                             "finalize_memory.json"))
    parser.add_argument("--measure-up-to", type=int, default=None,
                        help="run points with k up to this; extrapolate the larger ones")
    parser.add_argument("--merge", nargs="+", default=[],
                        help="earlier runs whose measured rows are kept: their JSON, or "
                             "the output of a --point run")
    parser.add_argument("--point", nargs=2, metavar=("K", "SOLVE"), help=argparse.SUPPRESS)
    parser.add_argument("--estimate", nargs=2, metavar=("K", "SOLVE"), help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.estimate:
        import jax

        from trax_attr import pipeline

        assert jax.device_count() == DEVICES, jax.devices()
        k = int(opts.estimate[0])
        print("RESULT " + json.dumps(_device_estimate(k, opts.estimate[1],
                                                      pipeline.chunk_rows(k))), flush=True)
        return
    if opts.point:
        with tempfile.TemporaryDirectory() as save_dir:
            result = point(int(opts.point[0]), opts.point[1], opts.n, opts.m, save_dir)
        print("RESULT " + json.dumps(result), flush=True)
        return

    host_ks = opts.host_ks or sorted(set(opts.ks) | {11585})
    runs = [(k, "host") for k in host_ks] + [(k, "sharded") for k in opts.ks]
    rows = [r for path in opts.merge for r in _rows_of(Path(path)) if not r["extrapolated"]]
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(DEVICES),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}")
    for k, solve in runs:
        if any(r["k"] == k and r["solve"] == solve for r in rows):
            continue
        if opts.measure_up_to is not None and k > opts.measure_up_to:
            continue
        predicted = _predict(k, solve, rows)
        if predicted > 0.8 * _available():
            print(f"k={k} {solve}: predicted {predicted / GIB:.1f} GiB > 80% of the "
                  f"{_available() / GIB:.1f} GiB available; not run", flush=True)
            continue
        src = opts.baseline_src if solve == "host" and opts.baseline_src else str(ROOT / "src")
        start = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--point", str(k), solve, "--n",
                               str(opts.n), "--m", str(opts.m)], env=dict(env, PYTHONPATH=src),
                              capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            print(f"k={k} {solve}: failed (exit {done.returncode}) after "
                  f"{time.perf_counter() - start:.0f} s\n{done.stderr[-2000:]}", flush=True)
            continue
        row = json.loads(lines[-1][len("RESULT "):])
        row["source"] = "baseline" if src != str(ROOT / "src") else "this checkout"
        rows.append(row)
        print(f"k={k} {solve}: features {row['features_rss_bytes'] / GIB:.2f} GiB in "
              f"{row['features_seconds']} s, scores {row['scores_rss_bytes'] / GIB:.2f} GiB",
              flush=True)
    for solve in ("host", "sharded"):
        measured = [r for r in rows if r["solve"] == solve]
        if len(measured) < 2:
            continue
        a, b = _fit(measured)
        for k in opts.ks:
            if any(r["k"] == k and r["solve"] == solve for r in rows):
                continue
            done = subprocess.run([sys.executable, __file__, "--estimate", str(k), solve],
                                  env=dict(env, PYTHONPATH=str(ROOT / "src")),
                                  capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            device = int(lines[-1][len("RESULT "):]) if lines else None
            rows.append({"k": k, "solve": solve, "features_rss_bytes": int(a + b * k * k),
                         "extrapolated": True, "fit": {"a": a, "b_per_k2": b,
                                                       "from_k": [r["k"] for r in measured]},
                         "scores_rss_bytes": None, "device_bytes_per_device": device,
                         "features_seconds": None})
    table = _table(rows)
    print(table)
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps({
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "python": platform.python_version()},
        "devices": DEVICES, "rows": rows, "table": table}, indent=1) + "\n")
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
