"""The store's file digest: blake2b (16 bytes) against xxh3_128, GB/s over 4 MiB buffers.

    python benchmarks/hashes.py          # best of 5 rounds of 160 MiB each, alternating
    python benchmarks/hashes.py --quick  # one round, for the smoke test

The store hashes every finished file as it writes or reads it (store/checksums.py), so a
finalize step's pass over Φ runs at the slower of the disk, the products and the hash.
JSON to benchmarks/results/hashes.json (hashes_quick.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import xxhash

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
DIGESTS = {"blake2b": lambda: hashlib.blake2b(digest_size=16), "xxh3_128": xxhash.xxh3_128}


def rate(make, buffer: memoryview, count: int = 40) -> float:
    """GB/s of one digest over ``count`` updates of ``buffer``."""
    t0 = time.perf_counter()
    hasher = make()
    for _ in range(count):
        hasher.update(buffer)
    hasher.hexdigest()
    return count * len(buffer) / (time.perf_counter() - t0) / 1e9


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one round, for the smoke test")
    args = ap.parse_args(argv)
    rounds = 1 if args.quick else 5
    buffer = memoryview(np.random.default_rng(0).standard_normal(1 << 20, np.float32)
                        .tobytes())
    best = dict.fromkeys(DIGESTS, 0.0)
    for _ in range(rounds):  # alternating: a drift of the machine's speed hits both
        for name, make in DIGESTS.items():
            best[name] = max(best[name], rate(make, buffer))
    out = {"GB_per_s": best, "speedup": best["xxh3_128"] / best["blake2b"],
           "load_average": os.getloadavg()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / ("hashes_quick.json" if args.quick else "hashes.json")).write_text(
        json.dumps(out, indent=1))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
