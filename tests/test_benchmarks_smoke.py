"""The benchmark scripts still run (tiny --quick mode), so they do not rot."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_run_all_quick():
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick"],
                   check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                   timeout=120)
    rows = json.loads((ROOT / "benchmarks/results/projection_roofline_quick.json").read_text())["rows"]
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    assert all(r["project_flops"] > 0 and r["matmul_flops"] > 0 for r in rows)
