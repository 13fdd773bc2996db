"""Meshes: which devices a TRAKer's batches, XᵀX and scores are split over.

One code path for 1 device and many: a :class:`jax.sharding.Mesh` of this process's
devices, axis ``"data"`` for examples and training rows, optionally ``"proj"`` to split
proj_dim (featurize) and a second axis to split targets (scores).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

__all__ = ["DATA_AXIS", "PROJ_AXIS", "default_mesh", "check_mesh", "pad_batch",
           "batch_shards", "pad_rows", "pad_axis", "rows_spec", "round_up"]

DATA_AXIS = "data"
PROJ_AXIS = "proj"


def default_mesh(devices=None) -> Mesh:
    """A 1-D mesh (axis ``"data"``) over ``devices``; all of this process's devices by default.

    The default is local on purpose: in a multi-host run each process featurizes its own
    rows on its own devices, and only XᵀX crosses processes (:func:`process_sum`).
    """
    devices = jax.local_devices() if devices is None else list(devices)
    return Mesh(np.array(devices), (DATA_AXIS,))


def check_mesh(mesh) -> Mesh:
    """``mesh`` if it is a usable Mesh of this process's devices, else a ValueError/TypeError."""
    if mesh is None:
        return default_mesh()
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"mesh must be a jax.sharding.Mesh or None (all local devices), got "
            f"{type(mesh).__name__}. Build one with jax.make_mesh((jax.local_device_count(),), "
            "('data',)).")
    if mesh.devices.ndim not in (1, 2):
        raise ValueError(
            f"mesh has {mesh.devices.ndim} axes {mesh.axis_names}; expected 1 (training rows and "
            "batches) or 2 (rows, targets).")
    local = set(jax.local_devices())
    foreign = [d for d in mesh.devices.flat if d not in local]
    if foreign:
        raise ValueError(
            f"mesh holds devices of other processes ({foreign[:4]}); the TRAKer's mesh must be "
            "this process's devices (jax.local_devices()); hosts combine XᵀX through the store.")
    return mesh


def rows_spec(mesh: Mesh) -> P:
    """Leading axis split over every mesh axis: batches and XᵀX use all devices."""
    return P(tuple(mesh.axis_names))


def pad_batch(batch: tuple, multiple: int) -> tuple:
    """Pad every array's leading axis to a multiple of ``multiple`` by repeating row 0.

    Repeating a real example keeps the padded rows finite; their outputs are dropped.
    """
    size = np.shape(batch[0])[0]
    extra = -size % multiple
    if extra == 0:
        return batch
    take = np.concatenate([np.arange(size), np.zeros(extra, np.int64)])
    return tuple(np.asarray(a)[take] for a in batch)


def batch_shards(mesh: Mesh) -> int:
    """How many slices a featurize batch is cut into: devices not on the ``"proj"`` axis."""
    return mesh.size // mesh.shape.get(PROJ_AXIS, 1)


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """``x (c, ...)`` padded with zero rows to ``rows`` (>= c) rows."""
    extra = rows - x.shape[0]
    if extra <= 0:
        return x
    return np.concatenate([x, np.zeros((extra,) + x.shape[1:], x.dtype)])


def pad_axis(x: np.ndarray, axis: int, multiple: int) -> np.ndarray:
    """``x`` padded with zeros along ``axis`` to a multiple of ``multiple``."""
    extra = -x.shape[axis] % multiple
    if extra == 0:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, extra)
    return np.pad(x, pad)


def round_up(value: int, multiple: int) -> int:
    return -(-int(value) // int(multiple)) * int(multiple)
