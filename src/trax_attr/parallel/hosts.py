"""Several processes (jax.distributed): which rows are whose, exact sums, barriers.

Several hosts share one store: each featurizes its own rows (:func:`process_rows`), then
``finalize_features`` sums the per-process XᵀX with :func:`process_sum`, an exact
all-gather of the bytes summed in process order, so every process holds the bit-identical
matrix.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["process_rows", "process_sum", "barrier", "broadcast_int"]


def process_rows(n: int, process_index: int | None = None,
                 process_count: int | None = None) -> range:
    """This process's contiguous slice of ``range(n)``; the slices tile it in process order."""
    index = jax.process_index() if process_index is None else int(process_index)
    count = jax.process_count() if process_count is None else int(process_count)
    return range(n * index // count, n * (index + 1) // count)


def process_sum(x: np.ndarray) -> np.ndarray:
    """Σ over processes of a host array, identical on every process; ``x`` itself with one.

    The raw bytes are all-gathered over a mesh of every device of every process (uint32,
    so nothing is rounded on the way) and summed on the host in process order, in ``x``'s
    own dtype: float64 XᵀX stays float64 although device arrays are float32 by default.
    """
    x = np.ascontiguousarray(x)
    if jax.process_count() == 1:
        return x
    raw = x.view(np.uint32) if x.dtype.itemsize % 4 == 0 else None
    if raw is None:
        raise TypeError(f"process_sum needs a 4- or 8-byte dtype, got {x.dtype}.")
    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("hosts",))
    local_count = jax.local_device_count()
    local = np.zeros((local_count,) + raw.shape, np.uint32)
    local[0] = raw
    shape = (len(devices),) + raw.shape
    array = jax.make_array_from_process_local_data(NamedSharding(mesh, P("hosts")), local, shape)
    gathered = jax.jit(lambda a: a, out_shardings=NamedSharding(mesh, P()))(array)
    everything = np.asarray(gathered.addressable_shards[0].data)
    owners = [d.process_index for d in devices]
    total = np.zeros_like(x)
    for process in range(jax.process_count()):
        slot = owners.index(process)
        total += everything[slot].view(x.dtype).reshape(x.shape)
    return total


def barrier() -> None:
    """Wait until every process reaches this point (no-op with one process)."""
    process_sum(np.zeros(1, np.float32))


def broadcast_int(value: int) -> int:
    """Process 0's ``value`` on every process (with one process: ``value``)."""
    mine = np.array([value if jax.process_index() == 0 else 0], np.int32)
    return int(process_sum(mine)[0])
