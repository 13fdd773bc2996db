"""Row arrays kept open between batches: reopened whenever a file is no longer the one mapped."""

import os

import numpy as np
import pytest

from trax_attr.store import KeptRows, Store, StoreCorruptedError


@pytest.fixture
def opener(tmp_path):
    store = Store(tmp_path / "store", {"a": 1})
    store.create_model(0, "f" * 32)
    opened = []

    def open_arrays():
        opened.append(1)
        return store.model_arrays(0, 10, 4)

    return store, open_arrays, opened


def test_the_same_files_are_not_opened_again(opener):
    _, open_arrays, opened = opener
    kept = KeptRows()
    first = kept.get(("train", 0), open_arrays)
    assert kept.get(("train", 0), open_arrays) is first and len(opened) == 1
    kept.get(("train", 1), open_arrays)  # another key
    assert len(opened) == 2


@pytest.mark.parametrize("change", ["replaced", "deleted", "resized"])
def test_a_changed_file_is_opened_again(opener, change):
    store, open_arrays, opened = opener
    kept = KeptRows()
    first = kept.get(("train", 0), open_arrays)
    path = store.array_path(0, "grads")
    if change == "replaced":  # another inode, same size and contents
        copy = path.with_name("copy.npy")
        copy.write_bytes(path.read_bytes())
        os.replace(copy, path)
    elif change == "deleted":
        path.unlink()
    else:
        with open(path, "ab") as handle:
            handle.write(b"\0" * 16)
    if change != "replaced":  # opened again, and the open says what is wrong
        with pytest.raises(StoreCorruptedError, match="missing" if change == "deleted"
                           else "bytes where its header needs"):
            kept.get(("train", 0), open_arrays)
        assert len(opened) == 2
        return
    again = kept.get(("train", 0), open_arrays)
    assert again is not first and len(opened) == 2
    again["grads"][0] = 1.0  # writes go to the file now in the store
    again["grads"].flush()
    assert np.load(path)[0, 0] == 1.0
