"""Run every benchmark (a subprocess each) and collect their tables in one file.

    python benchmarks/run_all.py           # all of them, see the README for the measured time (make bench)
    python benchmarks/run_all.py --quick   # tiny settings of the fast ones (the smoke test)

Each script writes its JSON to benchmarks/results/ and prints a table; the tables are
collected in benchmarks/results/README_table.md (README_table_quick.md with --quick).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
FULL = ["fresh_process.py", "featurize_vs_traker.py", "featurize_dtype.py",
        "projection_roofline.py", "structured.py", "scale.py", "lds_digits.py",
        "lambda_auto.py", "lambda_grid.py", "end_to_end.py"]
QUICK = ["featurize_vs_traker.py", "projection_roofline.py", "lds_digits.py", "lambda_auto.py",
         "end_to_end.py"]


def main():
    quick = "--quick" in sys.argv
    sections = []
    for script in QUICK if quick else FULL:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(HERE / script)] + (["--quick"] if quick else []),
                              check=True, capture_output=True, text=True)
        print(done.stdout, end="")
        sections.append(f"### `python benchmarks/{script}`{' --quick' if quick else ''} "
                        f"({time.perf_counter() - start:.0f} s)\n\n```\n{done.stdout.strip()}\n```\n")
    name = "README_table_quick.md" if quick else "README_table.md"
    (HERE / "results" / name).write_text("\n".join(sections))
    print(f"wrote {HERE / 'results' / name}")


if __name__ == "__main__":
    main()
