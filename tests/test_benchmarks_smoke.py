"""The benchmark scripts still run (tiny --quick mode), so they do not rot."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_run_all_quick():
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick"],
                   check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                   timeout=240)
    rows = json.loads((ROOT / "benchmarks/results/projection_roofline_quick.json").read_text())["rows"]
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    assert all(r["project_flops"] > 0 and r["matmul_flops"] > 0 for r in rows)
    rows = json.loads((ROOT / "benchmarks/results/featurize_vs_traker_quick.json").read_text())["rows"]
    assert {r["route"] for r in rows} == {"traker 0.3.2", "trax_attr, Flax twin",
                                          "trax_attr, converted torch", "trax_attr, torch.func"}
    assert all(r["examples_per_s"] > 0 for r in rows)
