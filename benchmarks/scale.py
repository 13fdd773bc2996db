"""Peak memory and time of featurize + finalize + top-k scoring against n_train.

    python benchmarks/scale.py                      # n_train = 10k, 100k, 1M; proj_dim 512
    python benchmarks/scale.py --sizes 10000 --targets 256

Each size runs in a fresh subprocess, so its peak RSS (ru_maxrss) is its own. The training
features are synthetic (random rows written straight into the store in chunks, as
``TRAKer.featurize`` writes them): featurizing a model for 1M rows would measure the model,
not the pipeline. finalize_features (XᵀX, Cholesky, Φ·A) and finalize_scores(top_k=10) are
the library's own streamed code paths, on all local devices. JSON in
benchmarks/results/scale.json.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def one_size(n: int, k: int, m: int, top_k: int, chunk: int, save_dir: str) -> dict:
    import jax
    import jax.numpy as jnp

    import trax_attr
    from trax_attr.store import row_checks, write_rows

    params = {"w": np.zeros((64, 10), np.float32), "b": np.zeros(10, np.float32)}
    traker = trax_attr.TRAKer(model=lambda p, x: x @ p["w"] + p["b"], train_set_size=n,
                              save_dir=save_dir, proj_dim=k, proj_dtype=jnp.float32,
                              lambda_reg=1e-2, chunk_rows=chunk)
    traker.load_checkpoint(params, model_id=0)
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    t0 = time.perf_counter()
    arrays = traker.store.model_arrays(0, n, k)  # create the files, then write by rows
    del arrays
    paths = {name: traker.store.array_path(0, name)
             for name in ("grads", "out_to_loss", "check", "done")}
    rng = np.random.default_rng(0)
    for start in range(0, n, chunk):
        c = min(chunk, n - start)
        grads = rng.standard_normal((c, k), np.float32)
        q = rng.uniform(0, 1, c).astype(np.float32)
        write_rows(paths["grads"], start, grads)
        write_rows(paths["out_to_loss"], start, q)
        write_rows(paths["check"], start, row_checks(np.arange(start, start + c), [grads, q],
                                                     traker.store.row_salt(0)))
        write_rows(paths["done"], start, np.ones(c, np.uint8))
    t_featurize = time.perf_counter() - t0
    rss_featurize = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    t0 = time.perf_counter()
    traker.finalize_features()
    t_finalize = time.perf_counter() - t0
    rss_finalize = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    traker.start_scoring_checkpoint("bench", params, model_id=0, num_targets=m)
    targets = traker.store.target_arrays("bench", 0, m, k)
    traker.store.write_rows(targets, np.arange(m), {"grads": rng.standard_normal((m, k),
                                                                              np.float32)},
                            np.ones(m, np.uint8))
    del targets
    t0 = time.perf_counter()
    top = traker.finalize_scores("bench", top_k=top_k)
    t_score = time.perf_counter() - t0
    assert top.proponents.shape == (m, top_k)
    return {
        "n_train": n, "proj_dim": k, "n_targets": m, "top_k": top_k, "chunk_rows": chunk,
        "devices": jax.local_device_count(),
        "featurize_s": round(t_featurize, 2), "finalize_s": round(t_finalize, 2),
        "topk_score_s": round(t_score, 2),
        "total_s": round(t_featurize + t_finalize + t_score, 2),
        "rss_after_setup_mb": round(rss_start),
        "peak_rss_after_featurize_mb": round(rss_featurize),
        "peak_rss_after_finalize_mb": round(rss_finalize),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "store_gb": round(2 * n * k * 4 / 1e9, 2),
        "dense_scores_would_be_gb": round(n * m * 4 / 1e9, 2),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--proj-dim", type=int, default=512)
    parser.add_argument("--targets", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--chunk-rows", type=int, default=16384)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale.json"))
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--save-dir", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child is not None:
        print(json.dumps(one_size(opts.child, opts.proj_dim, opts.targets, opts.top_k,
                                  opts.chunk_rows, opts.save_dir)))
        return
    rows = []
    for n in opts.sizes:
        with tempfile.TemporaryDirectory(prefix="trax_scale_") as tmp:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(n), "--save-dir", tmp,
                 "--proj-dim", str(opts.proj_dim), "--targets", str(opts.targets),
                 "--top-k", str(opts.top_k), "--chunk-rows", str(opts.chunk_rows)],
                env=env, check=True, capture_output=True, text=True, timeout=1800)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    result = {"command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "note": "synthetic training features written into the store; finalize and "
                      "top-k scoring are the library's streamed paths",
              "rows": rows}
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(result, indent=1) + "\n")
    header = ("n_train", "featurize_s", "finalize_s", "topk_score_s", "total_s", "peak_rss_mb")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{row[h]:,}" if isinstance(row[h], int) else str(row[h])
                                for h in header) + " |")


if __name__ == "__main__":
    main()
