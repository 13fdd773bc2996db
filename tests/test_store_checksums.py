"""File records: xxh3_128 written, blake2b records of older stores still verified."""

import hashlib

import numpy as np
import pytest
import xxhash

from trax_attr.store import StoreCorruptedError
from trax_attr.store.checksums import (RowStream, file_record, read_verified, record_digest,
                                       verify_file)
from trax_attr.store.reading import open_file
from trax_attr.store.schema import is_record


@pytest.fixture
def npy(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, np.arange(5000, dtype=np.float32).reshape(1000, 5))
    return path


def _blake2b(path):
    data = path.read_bytes()
    return {"bytes": len(data), "blake2b": hashlib.blake2b(data, digest_size=16).hexdigest()}


def _flip(path, at=-7):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


def _stream_verify(path, record):
    stream = RowStream(path, (1000, 5), np.float32)
    while stream._next < 1000:
        stream.read(stream._next, stream._next + 300)
    stream.verify(record, "a.npy", "fix it")


def _read_verified(path, record, mode):
    with open_file(path) as handle:
        return np.array(read_verified(handle, path, record, "a.npy", "fix it", (1000, 5),
                                      np.float32, mode=mode))


def test_records_are_xxh3_128_of_the_whole_file(npy):
    data = npy.read_bytes()
    record = file_record(npy)
    assert record == {"bytes": len(data), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}
    assert record_digest(record) == "xxh3_128" and is_record(record)
    stream = RowStream(npy, (1000, 5), np.float32)
    stream.read(0, 10)
    assert stream.record() == record  # rows not yet read are read


@pytest.mark.parametrize("digest", ["xxh3_128", "blake2b"])
def test_each_digest_verifies_its_file_and_catches_a_flipped_bit(npy, digest):
    record = file_record(npy) if digest == "xxh3_128" else _blake2b(npy)
    assert is_record(record)
    expected = np.load(npy)
    verify_file(npy, record, "a.npy", "fix it")
    _stream_verify(npy, record)
    for mode in ("r", "load"):
        np.testing.assert_array_equal(_read_verified(npy, record, mode), expected)
    _flip(npy)
    with pytest.raises(StoreCorruptedError, match=f"{digest} [0-9a-f]{{32}} != "):
        verify_file(npy, record, "a.npy", "fix it")
    with pytest.raises(StoreCorruptedError, match=digest):
        _stream_verify(npy, record)
    for mode in ("r", "load"):
        with pytest.raises(StoreCorruptedError, match=digest):
            _read_verified(npy, record, mode)


def test_a_record_without_a_known_digest_is_no_record(npy):
    record = {"bytes": npy.stat().st_size, "md5": "0" * 32}
    assert record_digest(record) is None and not is_record(record)
    with pytest.raises(StoreCorruptedError, match="no size and checksum record"):
        verify_file(npy, record, "a.npy", "fix it")


def test_a_staged_array_is_recorded_from_the_bytes_written(tmp_path):
    from trax_attr.store.writes import save_array

    value = np.arange(12, dtype=np.float32).reshape(3, 4)
    record = save_array(tmp_path / "b.npy", value)
    assert record == file_record(tmp_path / "b.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), value)
