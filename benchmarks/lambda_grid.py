"""A grid of λ on one featurized store: how long each λ costs after the first.

    python benchmarks/lambda_grid.py           # n = 5000 rows, k = 2048, M = 2, 6 values of λ
    python benchmarks/lambda_grid.py --quick   # n = 600, k = 256

The first ``finalize_features`` streams Φ once per checkpoint (XᵀX, then the inverse);
every later ``finalize_features(lambda_reg=...)`` starts from the stored XᵀX (``xtx.npy``)
and only factorises XᵀX + λI, and ``finalize_scores`` reuses the scored targets. The
table gives each step's time and the ratio of a re-finalize to the first finalize.
Writes benchmarks/results/lambda_grid[_quick].json.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import _mlp  # noqa: E402

import trax_attr  # noqa: E402

QUICK = "--quick" in sys.argv
N, K, M, TARGETS = (600, 256, 2, 50) if QUICK else (5000, 2048, 2, 200)
GRID = ["auto", 1e-2, 1.0, 10.0, 100.0, 1000.0]


def main():
    x, y = _mlp.shuffled_digits()
    rng = np.random.default_rng(0)
    rows = rng.integers(0, len(x), N)           # digits resampled with noise to n rows
    train = (x[rows] + rng.normal(0, 0.05, (N, 64)).astype(np.float32), y[rows])
    targets = (x[:TARGETS], y[:TARGETS])
    model = _mlp.MLP(hidden=128)
    checkpoints = [_mlp.MLP(hidden=128).init(jax.random.key(m), x[:1]) for m in range(M)]
    save_dir = tempfile.mkdtemp(prefix="lambda_grid-")
    traker = trax_attr.TRAKer(model=model, task="image_classification", train_set_size=N,
                              save_dir=save_dir, proj_dim=K)
    start = time.perf_counter()
    for m, params in enumerate(checkpoints):
        traker.load_checkpoint(params, model_id=m)
        for s in range(0, N, 500):
            traker.featurize((train[0][s:s + 500], train[1][s:s + 500]),
                             num_samples=len(train[0][s:s + 500]))
    featurize = time.perf_counter() - start
    rows_out = []
    for i, lam in enumerate(GRID):
        start = time.perf_counter()
        traker.finalize_features(lambda_reg=lam)
        finalize = time.perf_counter() - start
        if i == 0:
            for m, params in enumerate(checkpoints):
                traker.start_scoring_checkpoint("grid", params, model_id=m, num_targets=TARGETS)
                traker.score(targets, num_samples=TARGETS)
        start = time.perf_counter()
        scores = traker.finalize_scores("grid")
        rows_out.append({"lambda_reg": lam, "value": float(np.mean(
            [v["value"] for v in traker.lambdas().values()])),
            "finalize_features_s": finalize, "finalize_scores_s": time.perf_counter() - start,
            "score_norm": float(np.linalg.norm(scores))})
    first = rows_out[0]["finalize_features_s"]
    later = [r["finalize_features_s"] for r in rows_out[1:]]
    result = {"command": "python benchmarks/lambda_grid.py" + (" --quick" if QUICK else ""),
              "n": N, "k": K, "M": M, "targets": TARGETS, "featurize_s": featurize,
              "rows": rows_out, "first_finalize_s": first,
              "mean_refinalize_s": float(np.mean(later)),
              "refinalize_over_first": float(np.mean(later) / first)}
    out = Path(__file__).parent / "results" / f"lambda_grid{'_quick' if QUICK else ''}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"n = {N}, k = {K}, M = {M}: featurize {featurize:.1f} s")
    print("| lambda_reg | λ (mean over checkpoints) | finalize_features s | finalize_scores s |")
    print("|---|---|---|---|")
    for r in rows_out:
        print(f"| {r['lambda_reg']} | {r['value']:.4g} | {r['finalize_features_s']:.2f} | "
              f"{r['finalize_scores_s']:.2f} |")
    print(f"a re-finalize from the stored XᵀX takes {result['refinalize_over_first']:.2f} of "
          f"the first finalize")


if __name__ == "__main__":
    main()
