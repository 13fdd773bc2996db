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

Then the store's own object-store backend (``trax_attr.store.objrows``: every batch
writes Φ, Q, the row checks and then the done flags, each chunk with its crc32c; reads
stream Φ by chunk) on ``memory://`` (1 process), ``file://`` and ``s3://`` (moto's
server on 127.0.0.1, in a thread of this process) with 1 and 2 processes, each writing
and reading its own :func:`trax_attr.parallel.process_rows` (``--skip-object-store``
leaves this out). Rows/s there are all rows over the wall time of the slowest process.

Reads of files come from the page cache (nothing here can drop it): they measure the
backend's overhead, not the disk. The best of ``--repeats`` runs is reported (a shared
machine's noise only slows a run down). JSON in benchmarks/results/store_backends.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
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


# --- the store's object-store backend, 1 and 2 processes ----------------------------------
def _object_arrays(url: str, n: int, k: int, create: bool, owned=None):
    from trax_attr.store.objects import Objects
    from trax_attr.store.objrows import ObjectRowArrays, ObjectRows

    objects = Objects(url)
    arrays = ObjectRowArrays()
    arrays.rows = {name: ObjectRows(objects, name, shape, dtype, create=create,
                                    fill_missing=name == "done")
                   for name, shape, dtype in [("grads", (n, k), np.float32),
                                              ("out_to_loss", (n,), np.float32),
                                              ("check", (n,), np.uint64),
                                              ("done", (n,), np.uint8)]}
    arrays.update(arrays.rows)
    arrays["done"] = np.zeros(n, np.uint8)
    arrays.owned, arrays.what = owned, url
    return arrays


def _object_worker(url, n, k, batch, index, count, env, barrier, results):
    os.environ.update(env)
    from trax_attr.parallel import process_rows
    from trax_attr.store.objrows import write_object_rows

    mine = process_rows(n, index, count)
    arrays = _object_arrays(url, n, k, create=False, owned=mine)
    data = np.random.default_rng(index).standard_normal((len(mine), k), dtype=np.float32)
    barrier.wait()
    t0 = time.perf_counter()
    for start in range(mine.start, mine.stop, batch):
        rows = np.arange(start, min(start + batch, mine.stop))
        write_object_rows(arrays, rows, {"grads": data[rows - mine.start],
                                         "out_to_loss": data[rows - mine.start, 0]},
                          np.ones(len(rows), np.uint8))
    t_write = time.perf_counter() - t0
    barrier.wait()
    t0 = time.perf_counter()
    grads = arrays.rows["grads"]
    for start in range(mine.start, mine.stop, batch):
        got = grads.read(start, min(start + batch, mine.stop))
        if not np.array_equal(got, data[start - mine.start:start - mine.start + len(got)]):
            raise AssertionError(f"{url}: rows {start}.. read back differ")
    results.put((index, t_write, time.perf_counter() - t0))


def object_store_run(url: str, n: int, k: int, batch: int, count: int, env: dict) -> dict:
    """Write then read (n, k) rows through ``count`` processes (one in-process for memory://)."""
    os.environ.update(env)
    _object_arrays(url, n, k, create=True)
    if count == 1 and url.startswith("memory://"):
        import queue
        import threading

        results, barrier = queue.Queue(), threading.Barrier(1)
        _object_worker(url, n, k, batch, 0, 1, env, barrier, results)
        times = [results.get()]
    else:
        ctx = multiprocessing.get_context("spawn")
        results, barrier = ctx.Queue(), ctx.Barrier(count)
        procs = [ctx.Process(target=_object_worker,
                             args=(url, n, k, batch, i, count, env, barrier, results))
                 for i in range(count)]
        for proc in procs:
            proc.start()
        times = [results.get(timeout=600) for _ in procs]
        for proc in procs:
            proc.join()
            if proc.exitcode:
                raise RuntimeError(f"{url}: a worker failed ({proc.exitcode})")
    return {"write_s": max(t[1] for t in times), "read_s": max(t[2] for t in times)}


def object_store_rows(n, k, batch, repeats, parent) -> list[dict]:
    server_mod = __import__("moto.server", fromlist=["ThreadedMotoServer"])
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    empty = Path(parent) / "aws-none"
    empty.write_text("")
    env = {"TRAX_ATTR_S3_ENDPOINT": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1",
           "AWS_CONFIG_FILE": str(empty), "AWS_SHARED_CREDENTIALS_FILE": str(empty),
           "JAX_PLATFORMS": "cpu"}
    import boto3

    client = boto3.client("s3", endpoint_url=env["TRAX_ATTR_S3_ENDPOINT"],
                          region_name="us-east-1", aws_access_key_id="bench",
                          aws_secret_access_key="bench")
    out = []
    try:
        for kind, counts in [("memory", (1,)), ("file", (1, 2)), ("s3", (1, 2))]:
            for count in counts:
                runs = []
                for repeat in range(repeats):
                    tag = f"{kind}-{count}-{repeat}"
                    if kind == "s3":
                        client.create_bucket(Bucket=f"bench-{tag}")
                        url = f"s3://bench-{tag}/rows"
                    elif kind == "file":
                        url = f"file://{Path(parent).resolve()}/{tag}"
                    else:
                        url = f"memory://bench/{tag}"
                    runs.append(object_store_run(url, n, k, batch, count, env))
                w, r = min(x["write_s"] for x in runs), min(x["read_s"] for x in runs)
                out.append({"backend": f"trax_attr object store, {kind}", "processes": count,
                            "write_s": w, "read_s": r, "write_rows_per_s": n / w,
                            "read_rows_per_s": n / r, "write_mib_per_s": n * k * 4 / MIB / w,
                            "read_mib_per_s": n * k * 4 / MIB / r, "runs": runs})
                print(f"object store {kind}, {count} process(es): write {n / w:,.0f} rows/s, "
                      f"read {n / r:,.0f} rows/s", flush=True)
    finally:
        server.stop()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8192, help="rows")
    parser.add_argument("--k", type=int, default=2048, help="row length (proj_dim)")
    parser.add_argument("--chunk", type=int, default=256, help="rows per chunk")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    parser.add_argument("--dir", default=None, help="where the files go (default: a temp dir)")
    parser.add_argument("--skip-object-store", action="store_true",
                        help="leave out the store's object-store backend (needs moto)")
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
        objects = [] if opts.skip_object_store else object_store_rows(n, k, chunk,
                                                                      opts.repeats, parent)
    lines = [f"n = {n} rows x k = {k} float32 ({mib:.0f} MiB), chunks of {chunk} rows "
             f"({chunk * k * 4 / MIB:.1f} MiB), 1 process, best of {opts.repeats}",
             f"{'backend':<26} {'write rows/s':>13} {'MiB/s':>7} {'read rows/s':>12} "
             f"{'MiB/s':>7}"]
    for row in rows:
        lines.append(f"{row['backend']:<26} {row['write_rows_per_s']:>13,.0f} "
                     f"{row['write_mib_per_s']:>7,.0f} {row['read_rows_per_s']:>12,.0f} "
                     f"{row['read_mib_per_s']:>7,.0f}")
    if objects:
        lines += ["", "the store's object-store backend (Φ, Q, row checks, then done flags "
                  f"per batch of {chunk} rows; s3 = moto's server on 127.0.0.1)",
                  f"{'backend':<34} {'processes':>9} {'write rows/s':>13} {'MiB/s':>7} "
                  f"{'read rows/s':>12} {'MiB/s':>7}"]
        for row in objects:
            lines.append(f"{row['backend']:<34} {row['processes']:>9} "
                         f"{row['write_rows_per_s']:>13,.0f} {row['write_mib_per_s']:>7,.0f} "
                         f"{row['read_rows_per_s']:>12,.0f} {row['read_mib_per_s']:>7,.0f}")
    table = "\n".join(lines)
    print(table)
    versions = {}
    for module in ("tensorstore", "zarr", "numpy", "moto"):
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
        "rows": rows, "object_store": objects, "table": table}, indent=1) + "\n")
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
