"""Several processes (jax.distributed): which rows are whose, exact sums, barriers.

Several hosts share one store: each featurizes its own rows (:func:`process_rows`), then
``finalize_features`` sums the per-process XᵀX with :func:`process_sum`, an exact
all-gather of the bytes summed in process order, so every process holds the bit-identical
matrix (or, for large k, accumulates it sharded: :mod:`.solve`). ``finalize_scores``
splits the training rows the same way and gathers the scores (:func:`process_concat`).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["ROW_BLOCK", "process_rows", "process_sum", "process_allgather", "process_concat", "barrier",
           "broadcast_int"]


ROW_BLOCK = 256  # process_rows boundaries are multiples of it (chunks of object stores)


def process_rows(n: int, process_index: int | None = None,
                 process_count: int | None = None, *, block: int = ROW_BLOCK) -> range:
    """This process's contiguous slice of ``range(n)``; the slices tile it in process order.

    Slices start at multiples of ``block`` rows: every chunk of rows of an object store
    (a power of two dividing :data:`ROW_BLOCK`) then belongs to one process's slice, so
    no two hosts write one object. ``block=1``: slices as even as can be.
    """
    index = jax.process_index() if process_index is None else int(process_index)
    count = jax.process_count() if process_count is None else int(process_count)
    blocks = -(-int(n) // block)

    def start(i):
        return min(int(n), block * (blocks * i // count))

    return range(start(index), start(index + 1))


def process_allgather(x: np.ndarray) -> np.ndarray:
    """``(processes, *x.shape)``: every process's ``x`` (same shape and dtype on all), in
    process order, on every process; ``x[None]`` with one process.

    The raw bytes travel (as uint8), so nothing is rounded on the way: float64 stays
    float64 although device arrays are float32 by default. One device per process takes
    part, so the gathered copy exists once per host, not once per device.
    """
    x = np.ascontiguousarray(x)
    if jax.process_count() == 1:
        return x[None]
    firsts = {}
    for d in jax.devices():
        firsts.setdefault(d.process_index, d)
    mesh = Mesh(np.array([firsts[p] for p in sorted(firsts)]), ("hosts",))
    raw = x.reshape(-1).view(np.uint8)[None]
    shape = (len(firsts), raw.shape[1])
    array = jax.make_array_from_process_local_data(NamedSharding(mesh, P("hosts")), raw, shape)
    gathered = jax.jit(lambda a: a, out_shardings=NamedSharding(mesh, P()))(array)
    everything = np.asarray(gathered.addressable_shards[0].data)
    return everything.view(x.dtype).reshape((len(firsts),) + x.shape)


def process_concat(x: np.ndarray) -> np.ndarray:
    """Every process's ``x (r_p, ...)`` concatenated along axis 0 in process order, on
    every process (r_p may differ; the other axes and the dtype may not)."""
    x = np.ascontiguousarray(x)
    if jax.process_count() == 1:
        return x
    sizes = process_allgather(np.array([x.shape[0]], np.int64))[:, 0]
    padded = np.zeros((int(sizes.max()),) + x.shape[1:], x.dtype)
    padded[:x.shape[0]] = x
    gathered = process_allgather(padded)
    return np.concatenate([gathered[p, :size] for p, size in enumerate(sizes)])


def process_sum(x: np.ndarray) -> np.ndarray:
    """Σ over processes of a host array, identical on every process; ``x`` itself with one.

    The arrays are gathered exactly (:func:`process_allgather`) and summed on the host in
    process order, in ``x``'s own dtype.
    """
    x = np.ascontiguousarray(x)
    if jax.process_count() == 1:
        return x
    if x.dtype.itemsize % 4:
        raise TypeError(f"process_sum needs a 4- or 8-byte dtype, got {x.dtype}.")
    everything = process_allgather(x)
    total = np.zeros_like(x)
    for process in range(everything.shape[0]):
        total += everything[process]
    return total


def barrier() -> None:
    """Wait until every process reaches this point (no-op with one process)."""
    process_sum(np.zeros(1, np.float32))


def broadcast_int(value: int) -> int:
    """Process 0's ``value`` on every process (with one process: ``value``)."""
    mine = np.array([value if jax.process_index() == 0 else 0], np.int32)
    return int(process_sum(mine)[0])
