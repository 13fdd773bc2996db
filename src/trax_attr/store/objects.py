"""Objects of a URL store (``memory://``, ``file://``, ``s3://``, ``gs://``) through
tensorstore: small JSON objects, and zarr v3 arrays of rows in chunks of whole rows.

    memory://name/prefix   tensorstore's memory kvstore, one per process (tests)
    file:///abs/prefix     tensorstore's file kvstore
    s3://bucket/prefix     the s3 kvstore; credentials from the environment
                           (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN or
                           the usual AWS profile chain), region from AWS_REGION (default
                           us-east-1), and TRAX_ATTR_S3_ENDPOINT (e.g.
                           http://127.0.0.1:9000) for an S3-compatible server
    gs://bucket/prefix     the gcs kvstore; credentials from the environment (application
                           default credentials)

Every chunk of an array carries a crc32c (zarr's ``crc32c`` codec), so a damaged chunk
fails to decode; values are read with ``fill_missing_data_reads=False``, so a missing
chunk is an error naming it, never zeros. Both become :class:`StoreCorruptedError`.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from .errors import StoreCorruptedError, StoreWriteError
from .reading import JSON_MAX_BYTES

__all__ = ["SCHEMES", "is_url", "ObjectPath", "Objects", "kvstore_spec"]

SCHEMES = ("memory", "file", "s3", "gs")


def is_url(save_dir) -> bool:
    """Whether ``save_dir`` names an object store (``scheme://...``), not a local folder."""
    return isinstance(save_dir, str) and "://" in save_dir


class ObjectPath(str):
    """The URL of an object or prefix, with the ``/``, ``.name`` and ``.parent`` of a
    path, so that messages built for files name objects the same way."""

    def __truediv__(self, part: str) -> ObjectPath:
        return ObjectPath(f"{self.rstrip('/')}/{part}")

    @property
    def name(self) -> str:
        return self.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(self.rstrip("/").rsplit("/", 1)[0])


def kvstore_spec(url: str) -> dict[str, Any]:
    """The tensorstore kvstore spec of a store URL (see the module docstring)."""
    parts = urlsplit(url)
    scheme, prefix = parts.scheme, parts.path.strip("/")
    if scheme not in SCHEMES or (scheme != "file" and not parts.netloc):
        raise ValueError(
            f"save_dir={url!r} is not a store URL tensorstore can open: use a local folder, "
            "memory://name, file:///absolute/folder, s3://bucket/prefix or gs://bucket/prefix.")
    if scheme == "memory":
        return {"driver": "memory", "path": f"{parts.netloc}/{prefix}/".replace("//", "/")}
    if scheme == "file":
        return {"driver": "file", "path": f"/{prefix}/"}
    path = f"{prefix}/" if prefix else ""
    if scheme == "gs":
        return {"driver": "gcs", "bucket": parts.netloc, "path": path}
    spec = {"driver": "s3", "bucket": parts.netloc, "path": path,
            "aws_region": os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
    endpoint = os.environ.get("TRAX_ATTR_S3_ENDPOINT")
    if endpoint:
        spec["endpoint"] = endpoint
    return spec


@functools.cache
def _memory_context():
    # memory:// objects live in one tensorstore context for the whole process, so that a
    # store reopened in the same process (a resumed TRAKer in a test) finds them.
    import tensorstore as ts

    return ts.Context()


def _tensorstore():
    try:
        import tensorstore as ts
    except ImportError:  # pragma: no cover - tensorstore comes with the stores extra
        raise ImportError("a save_dir URL needs tensorstore: pip install "
                          "'trax_attr[stores]' (or tensorstore).") from None
    return ts


class Objects:
    """The objects under one store URL: JSON records and arrays of rows."""

    def __init__(self, url: str):
        self.ts = _tensorstore()
        self.url = ObjectPath(url.rstrip("/"))
        self.spec = kvstore_spec(url)
        self.context = _memory_context() if self.spec["driver"] == "memory" else None
        try:
            self.kv = self.ts.KvStore.open(self.spec, context=self.context).result()
        except ValueError as err:
            raise ValueError(f"cannot open the object store {self.url!r}: {err}") from None

    def where(self, key: str) -> ObjectPath:
        """The URL of ``key`` (for messages)."""
        return self.url / key

    # --- JSON records ------------------------------------------------------------------
    def read_json(self, key: str) -> dict[str, Any] | None:
        """The JSON object at ``key``, None if there is none."""
        try:
            found = self.kv.read(key).result()
        except ValueError as err:
            raise StoreCorruptedError(f"cannot read {self.where(key)!r}: {err}") from None
        if found.state != "value":
            return None
        raw = found.value
        if len(raw) > JSON_MAX_BYTES:
            raise StoreCorruptedError(f"{self.where(key)!r} holds {len(raw)} bytes, more than "
                                      "any metadata of the store; it is not the store's.")
        try:
            data = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as err:
            raise StoreCorruptedError(
                f"{self.where(key)!r} is not valid JSON ({str(err)[:200]}); the store's "
                "metadata is corrupted. Restore it or delete the objects it describes."
            ) from None
        if not isinstance(data, dict):
            raise StoreCorruptedError(f"{self.where(key)!r} does not hold a JSON object; the "
                                      "store's metadata is corrupted.")
        return data

    def write_json(self, key: str, data: dict[str, Any]) -> None:
        """Replace the object ``key`` by ``data`` (one PUT: readers see old or new)."""
        raw = json.dumps(data, indent=1, sort_keys=True, allow_nan=False).encode()
        self._put(key, raw)

    def _put(self, key: str, raw: bytes) -> None:
        try:
            self.kv.write(key, raw).result()
        except ValueError as err:
            raise StoreWriteError(None, f"could not write {self.where(key)!r}: {err}. Nothing "
                                  "already stored was changed; fix the bucket's permissions or "
                                  "credentials and call again.") from None

    def exists(self, key: str) -> bool:
        try:
            return self.kv.read(key).result().state == "value"
        except ValueError as err:
            raise StoreCorruptedError(f"cannot read {self.where(key)!r}: {err}") from None

    def list(self, prefix: str) -> list[str]:
        """The keys under ``prefix`` (relative to it)."""
        keys = self.kv.list(_range(self.ts, prefix)).result()
        return sorted(k.decode()[len(prefix):] for k in keys)

    # --- arrays ------------------------------------------------------------------------
    def array(self, key: str, shape: tuple[int, ...], dtype, chunk: int, *, create: bool,
              fill_missing: bool = False):
        """The zarr v3 array at prefix ``key`` (``shape``, ``dtype``, chunks of ``chunk``
        whole rows), created if absent and ``create``; shape and dtype checked."""
        spec = {"driver": "zarr3", "kvstore": {**self.spec, "path": self.spec["path"] + key + "/"},
                # a chunk of zeros (zeroed rows) is stored too: a missing chunk is an error
                "fill_missing_data_reads": fill_missing, "store_data_equal_to_fill_value": True}
        dtype = np.dtype(dtype)
        want = {"shape": list(shape), "data_type": dtype.name,
                "chunk_grid": {"name": "regular", "configuration": {
                    "chunk_shape": [max(1, min(chunk, shape[0]))] + list(shape[1:])}},
                "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                           {"name": "crc32c"}]}
        try:
            found = self.ts.open(spec, open=True, context=self.context).result()
        except ValueError as err:
            if "NOT_FOUND" not in str(err):
                raise self.corrupted(key, err) from None
            if not create:
                raise StoreCorruptedError(f"{self.where(key)!r} does not exist. Featurize the "
                                          "rows it holds again.") from None
            try:
                return self.ts.open({**spec, "metadata": want}, create=True, open=True,
                                    context=self.context).result()
            except ValueError as err:
                raise StoreWriteError(None, f"could not create {self.where(key)!r}: {err}"
                                      ) from None
        if tuple(found.shape) != tuple(shape) or found.dtype.numpy_dtype != dtype:
            raise StoreCorruptedError(
                f"{self.where(key)!r} holds {found.dtype.numpy_dtype}{list(found.shape)}, "
                f"expected {dtype}{list(shape)}; the store was written with other settings. "
                f"Delete the prefix {self.where(key).parent!r} to recompute it.")
        return found

    def corrupted(self, key: str, err: Exception) -> StoreCorruptedError:
        return StoreCorruptedError(
            f"an object of {self.where(key)!r} is missing or damaged ({str(err)[:400]}); "
            f"nothing of it was used. Delete the prefix {self.where(key).parent!r} to "
            "recompute what it held.")

    def delete_prefix(self, key: str) -> None:
        self.kv.delete_range(_range(self.ts, key)).result()


def _range(ts, prefix: str):
    """The keys that start with ``prefix``."""
    return ts.KvStore.KeyRange(prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1))
