"""The host inverse of finalize_features at k = 2048 with the BLAS capped at 1 and 2 threads
and uncapped, interleaved, 5 runs each: why engine.linalg.inverse_gram caps it.

    python benchmarks/blas_threads.py [--k 2048] [--runs 5]

Writes benchmarks/results/blas_threads.json and prints a table (median and best seconds).
Meaningful side by side only: run it on the machine, and under the load, you care about.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from trax_attr.engine import linalg


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    phi = rng.normal(size=(2 * args.k, args.k)).astype(np.float32)
    gram = (phi.T @ phi).astype(np.float64)
    settings = {"1": 1, "2": 2, "uncapped": None}
    times = {name: [] for name in settings}
    for _ in range(args.runs):
        for name, limit in settings.items():
            cap = threadpool_limits(limits=limit, user_api="blas") if limit else \
                contextlib.nullcontext()
            with cap:
                start = time.perf_counter()
                linalg._inverse_gram(gram, 1.0, False)  # the uncapped core of inverse_gram
                times[name].append(time.perf_counter() - start)
    rows = {name: {"median_s": float(np.median(t)), "best_s": float(np.min(t)), "runs": t}
            for name, t in times.items()}
    result = {"command": "python benchmarks/blas_threads.py", "k": args.k,
              "cap_used": linalg.blas_threads(), "rows": rows}
    out = Path(__file__).parent / "results" / "blas_threads.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"k = {args.k}; inverse_gram caps the BLAS at {linalg.blas_threads()} thread(s) here")
    print("| BLAS threads | median | best |")
    print("|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['median_s']:.2f} s | {row['best_s']:.2f} s |")


if __name__ == "__main__":
    main()
