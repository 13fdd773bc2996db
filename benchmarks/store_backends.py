"""Row-chunk write and read throughput of candidate store backends, one process.

    python benchmarks/store_backends.py                      # n = 8192 rows of k = 2048 f32
    python benchmarks/store_backends.py --n 4096 --k 1024 --chunk 128 --repeats 5

The workload is the store's: a (n, k) float32 array (Φ of one checkpoint) written as
row chunks of ``--chunk`` rows in order (featurize), then read back chunk by chunk in
order (finalize). Each backend stores one chunk per row chunk, uncompressed (gradients
projected to float32 do not compress), and every read is checked against what was
written. Backends:

* ``local store``: today's store, ``store.writes.write_rows`` / ``read_rows`` into one
  .npy (plain file IO, fsync after every chunk: its crash guarantee);
* ``local, no fsync``: the same writes without the fsync (the cost of the guarantee);
* ``tensorstore zarr3 file`` / ``memory``: tensorstore's zarr v3 driver on its file
  kvstore (temp file + rename per chunk, the file_io_sync default) and on memory;
* ``zarr-python file`` / ``memory``: zarr-python 3 on a LocalStore / MemoryStore.

Reads of files come from the page cache (nothing here can drop it): they measure the
backend's overhead, not the disk. The best of ``--repeats`` runs is reported (a shared
machine's noise only slows a run down). JSON in benchmarks/results/store_backends.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20


def _local(directory: Path, n: int, k: int, chunk: int, sync: bool):
    from trax_attr.store.reading import read_rows, rows_layout
    from trax_attr.store.writes import write_rows

    path = directory / "grads.npy"
    np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, k)).flush()
    offset = rows_layout(path)[0]

    def write(start, values):
        if sync:
            write_rows(path, start, values)
            return
        with open(path, "r+b") as handle:
            handle.seek(offset + start * k * 4)
            handle.write(memoryview(np.ascontiguousarray(values).reshape(-1)).cast("B"))

    return write, lambda start, stop: read_rows(path, start, stop)


def _tensorstore(directory: Path | None, n: int, k: int, chunk: int):
    import tensorstore as ts

    kvstore = {"driver": "memory"} if directory is None else \
        {"driver": "file", "path": str(directory / "grads.zarr")}
    array = ts.open({"driver": "zarr3", "kvstore": kvstore,
                     "metadata": {"shape": [n, k], "data_type": "float32",
                                  "chunk_grid": {"name": "regular",
                                                 "configuration": {"chunk_shape": [chunk, k]}},
                                  "codecs": [{"name": "bytes",
                                              "configuration": {"endian": "little"}}]}},
                    create=True, delete_existing=True).result()

    def write(start, values):
        array[start:start + len(values)].write(values).result()

    return write, lambda start, stop: array[start:stop].read().result()


def _zarr(directory: Path | None, n: int, k: int, chunk: int):
    import zarr
    from zarr.storage import LocalStore, MemoryStore

    store = MemoryStore() if directory is None else LocalStore(str(directory / "grads.zarr"))
    array = zarr.create_array(store, shape=(n, k), chunks=(chunk, k), dtype="float32",
                              compressors=None, filters=None, zarr_format=3, overwrite=True)

    def write(start, values):
        array[start:start + len(values)] = values

    return write, lambda start, stop: array[start:stop]


BACKENDS = {
    "local store": lambda d, n, k, c: _local(d, n, k, c, sync=True),
    "local, no fsync": lambda d, n, k, c: _local(d, n, k, c, sync=False),
    "tensorstore zarr3 file": lambda d, n, k, c: _tensorstore(d, n, k, c),
    "tensorstore zarr3 memory": lambda d, n, k, c: _tensorstore(None, n, k, c),
    "zarr-python file": lambda d, n, k, c: _zarr(d, n, k, c),
    "zarr-python memory": lambda d, n, k, c: _zarr(None, n, k, c),
}


def run(name: str, n: int, k: int, chunk: int, data: np.ndarray, parent: str) -> dict:
    """One write pass and one read pass of ``data (n, k)`` through backend ``name``."""
    directory = Path(tempfile.mkdtemp(dir=parent)).resolve()   # tensorstore: no ".."
    try:
        write, read = BACKENDS[name](directory, n, k, chunk)
        t0 = time.perf_counter()
        for start in range(0, n, chunk):
            write(start, data[start:start + chunk])
        t_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        for start in range(0, n, chunk):
            got = read(start, min(start + chunk, n))
            if not np.array_equal(got, data[start:start + chunk]):
                raise AssertionError(f"{name}: rows {start}.. read back differ")
        t_read = time.perf_counter() - t0
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return {"write_s": t_write, "read_s": t_read}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8192, help="rows")
    parser.add_argument("--k", type=int, default=2048, help="row length (proj_dim)")
    parser.add_argument("--chunk", type=int, default=256, help="rows per chunk")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    parser.add_argument("--dir", default=None, help="where the files go (default: a temp dir)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                             "store_backends.json"))
    opts = parser.parse_args()
    n, k, chunk = opts.n, opts.k, opts.chunk
    data = np.random.default_rng(0).standard_normal((n, k), dtype=np.float32)
    mib = data.nbytes / MIB
    rows = []
    with tempfile.TemporaryDirectory(dir=opts.dir) as parent:
        for name in opts.backends:
            runs = [run(name, n, k, chunk, data, parent) for _ in range(opts.repeats)]
            w, r = min(x["write_s"] for x in runs), min(x["read_s"] for x in runs)
            rows.append({"backend": name, "write_s": w, "read_s": r,
                         "write_rows_per_s": n / w, "read_rows_per_s": n / r,
                         "write_mib_per_s": mib / w, "read_mib_per_s": mib / r,
                         "runs": runs})
            print(f"{name}: write {n / w:,.0f} rows/s, read {n / r:,.0f} rows/s", flush=True)
    lines = [f"n = {n} rows x k = {k} float32 ({mib:.0f} MiB), chunks of {chunk} rows "
             f"({chunk * k * 4 / MIB:.1f} MiB), 1 process, best of {opts.repeats}",
             f"{'backend':<26} {'write rows/s':>13} {'MiB/s':>7} {'read rows/s':>12} "
             f"{'MiB/s':>7}"]
    for row in rows:
        lines.append(f"{row['backend']:<26} {row['write_rows_per_s']:>13,.0f} "
                     f"{row['write_mib_per_s']:>7,.0f} {row['read_rows_per_s']:>12,.0f} "
                     f"{row['read_mib_per_s']:>7,.0f}")
    table = "\n".join(lines)
    print(table)
    versions = {}
    for module in ("tensorstore", "zarr", "numpy"):
        try:
            from importlib.metadata import version
            versions[module] = version(module)
        except Exception:  # noqa: BLE001 - a missing package is reported, not fatal
            versions[module] = None
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps({
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "python": platform.python_version()},
        "versions": versions, "n": n, "k": k, "chunk": chunk, "repeats": opts.repeats,
        "rows": rows, "table": table}, indent=1) + "\n")
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
