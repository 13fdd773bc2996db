"""Run every benchmark script (subprocess each) and regenerate results/README_table.md.

    python benchmarks/run_all.py [--quick]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
SCRIPTS = ["projection_roofline.py"]  # featurize_vs_traker, lds_digits, end_to_end: not written yet


def main():
    quick = "--quick" in sys.argv
    for s in SCRIPTS:
        subprocess.run([sys.executable, str(HERE / s)] + (["--quick"] if quick else []), check=True)
    lines = ["| benchmark | d | k | dtype | project GFLOP/s | matmul GFLOP/s | ratio |",
             "|---|---|---|---|---|---|---|"]
    f = HERE / "results" / ("projection_roofline_quick.json" if quick else "projection_roofline.json")
    for r in json.loads(f.read_text())["rows"]:
        lines.append(f"| projection | {r['d']} | {r['k']} | {r['dtype']} | {r['project_flops']/1e9:.2f}"
                     f" | {r['matmul_flops']/1e9:.2f} | {r['ratio']:.2f} |")
    (HERE / "results" / ("README_table_quick.md" if quick else "README_table.md")).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
