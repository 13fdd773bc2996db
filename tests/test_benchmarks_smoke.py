"""The benchmark scripts still run (tiny --quick mode), so they do not rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _env():
    """A bare environment (no device or XLA flags of the test process) that keeps the
    suite's JAX compilation cache (tests/conftest.py)."""
    keep = {k: v for k, v in os.environ.items()
            if k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    return {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", **keep}


def test_run_all_quick():
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick"],
                   check=True, cwd=ROOT, env=_env(),
                   timeout=900)
    rows = json.loads((ROOT / "benchmarks/results/projection_roofline_quick.json").read_text())["rows"]
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    assert all(r["project_flops"] > 0 and r["matmul_flops"] > 0 for r in rows)
    rows = json.loads((ROOT / "benchmarks/results/featurize_vs_traker_quick.json").read_text())["rows"]
    assert {r["route"] for r in rows} == {"traker 0.3.2", "trax_attr, Flax twin",
                                          "trax_attr, converted torch", "trax_attr, torch.func"}
    assert all(r["examples_per_s"] > 0 for r in rows)

    out = json.loads((ROOT / "benchmarks/results/lds_digits_quick.json").read_text())
    assert {(r["library"], r["M"]) for r in out["rows"]} == {
        (lib, m) for lib in ("trax_attr", "traker 0.3.2") for m in (1, 2)}
    for r in out["rows"] + list(out["baselines"].values()):
        assert -1 <= r["low"] <= r["lds"] <= r["high"] <= 1
    assert all(r["seconds"] > 0 for r in out["rows"])
    assert set(out["baselines"]) == {"grad_dot", "grad_cosine", "random"}
    # TRAK and the gradient baselines carry signal; the random baseline does not
    assert min(r["lds"] for r in out["rows"]) > out["baselines"]["random"]["high"]
    assert set(out["goals"]) == {"lds_at_equal_M_k_at_least_traker_or_within_ci",
                                 "lds_rising_with_M", "lds_vs_time_above_traker_at_every_point"}
    assert all(isinstance(g["met"], bool) for g in out["goals"].values())

    out = json.loads((ROOT / "benchmarks/results/lambda_auto_quick.json").read_text())
    assert {(r["setting"], r["k"], r["M"]) for r in out["rows"]} == {
        (s, k, m) for s in ("digits_mlp", "binary_digits") for k in (32, 256) for m in (1, 2)}
    for r in out["rows"]:
        assert all(-1 <= r[p]["low"] <= r[p]["lds"] <= r[p]["high"] <= 1
                   for p in ("auto", "best", "lambda0"))
        assert len(r["auto_lambdas"]) == r["M"] and min(r["auto_lambdas"]) > 0
        if r["k"] > r["n"]:  # λ = 0 interpolates there; the automatic ridge is far better
            assert r["auto"]["low"] > r["lambda0"]["high"]
    assert out["library_cross_check"]["met"]

    out = json.loads((ROOT / "benchmarks/results/end_to_end_quick.json").read_text())
    assert {(r["library"], r["n_train"]) for r in out["rows"]} == {
        (lib, n) for lib in ("trax_attr", "traker 0.3.2") for n in (500, 1000)}
    assert all(r["seconds"] > 0 and r["peak_rss_mib"] >= r["rss_before_mib"] > 0
               for r in out["rows"])
    assert {(r["library"], r["malloc"]) for r in out["rows"]} == {
        (lib, m) for lib in ("trax_attr", "traker 0.3.2")
        for m in ("glibc default", "fixed mmap threshold")}
    assert set(out["memory"]) == {f"{lib}, {m}" for lib in ("trax_attr", "traker 0.3.2")
                                  for m in ("glibc default", "fixed mmap threshold")}


def test_fresh_process_quick():
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fresh_process.py"), "--quick"],
                   check=True, cwd=ROOT, env=_env(),
                   timeout=900)
    (row,) = json.loads((ROOT / "benchmarks/results/fresh_process_quick.json").read_text())["rows"]
    phases = ("featurize", "finalize_features", "score", "finalize_scores")
    for lib in ("trax_attr", "traker 0.3.2"):
        assert all(row["best_s"][lib][p] > 0 for p in phases)
        assert row["best_s"][lib]["process_s"] > row["best_s"][lib]["total"]
        assert row["best_s"][lib]["import"] > 0 and row["best_s"][lib]["setup"] > 0
    assert all(row["bound_s"][p] > 0 for p in phases)
    assert row["rates"]["dot_float32_flops"] > 0 and row["rates"]["dot_bfloat16_flops"] > 0
    assert row["rates"]["xtx_flops"] > 0 and row["rates"]["inverse_s"] > 0


def test_hashes():
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hashes.py"), "--quick"],
                   check=True, cwd=ROOT, timeout=120)
    out = json.loads((ROOT / "benchmarks/results/hashes_quick.json").read_text())
    assert set(out["GB_per_s"]) == {"blake2b", "xxh3_128"}
    assert all(rate > 0 for rate in out["GB_per_s"].values())
