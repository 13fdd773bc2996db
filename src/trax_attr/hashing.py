"""One digest for everything trax_attr fingerprints: weights, files, cache keys.

blake2b with 16-byte digests, over arrays (dtype, shape and bytes, so equal values of other
dtypes or shapes differ), JSON-able values (sorted keys) and files read in chunks.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

__all__ = ["digest", "Hasher", "file_digest", "fingerprint"]

_FILE_CHUNK = 1 << 22  # bytes read per step when hashing a file (4 MiB, one buffer)


class Hasher:
    """An incremental digest: ``update`` with arrays, bytes or JSON-able values."""

    def __init__(self):
        self._h = hashlib.blake2b(digest_size=16)

    def update(self, part: Any) -> "Hasher":
        if isinstance(part, (bytes, bytearray, memoryview)):
            self._h.update(part)
        elif isinstance(part, np.ndarray) or hasattr(part, "__array__"):
            array = np.asarray(part)
            self._h.update(str((array.dtype.str, array.shape)).encode())
            self._h.update(np.ascontiguousarray(array).tobytes())
        else:
            self._h.update(json.dumps(part, sort_keys=True, default=repr).encode())
        return self

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def digest(*parts: Any) -> str:
    """Hex digest of ``parts`` (arrays, bytes or JSON-able values), in order."""
    h = Hasher()
    for part in parts:
        h.update(part)
    return h.hexdigest()


def file_digest(path: str | os.PathLike) -> tuple[int, str]:
    """``(size in bytes, hex digest)`` of a file's contents, read in 4 MiB chunks."""
    h = hashlib.blake2b(digest_size=16)
    size = 0
    buffer = memoryview(bytearray(_FILE_CHUNK))
    with open(path, "rb") as handle:
        while count := handle.readinto(buffer):
            h.update(buffer[:count])
            size += count
    return size, h.hexdigest()


def fingerprint(*trees) -> str:
    """A digest of every array leaf of ``trees``: equal weights, equal fingerprint.

    PRNG key arrays (flax's RNG state) enter by their key data."""
    import jax

    h = Hasher()
    for tree in trees:
        for leaf in jax.tree_util.tree_leaves(tree):
            if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype,
                                                                     jax.dtypes.prng_key):
                leaf = jax.random.key_data(leaf)
            h.update(np.asarray(leaf))
    return h.hexdigest()
