"""Store faults: corruption, truncation, crashes inside a write, locks, full or read-only disk,
paths that escape save_dir, and pickles."""

import errno
import json
import os
import subprocess
import threading
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import trax_attr
from linear_model import linear_apply
from trax_attr.store import checksums, writes
from trax_attr.store import store as store_module
from trax_attr.store import Store, StoreBusyError, StoreWriteError

N, M, B, K = 64, 16, 32, 16


@pytest.fixture(scope="module")
def data(digits):
    x, y = digits
    return (x[:N], y[:N]), (x[1500:1500 + M], y[1500:1500 + M])


def make(save_dir, n=N, **kwargs):
    return trax_attr.TRAKer(model=linear_apply, task="image_classification", train_set_size=n,
                            save_dir=save_dir, proj_dim=K, proj_dtype=jnp.float32,
                            lambda_reg=1e-2, **kwargs)


def run(traker, params, data, model_id=0, finalize=True):
    (x, y), target = data
    traker.load_checkpoint(params, model_id=model_id)
    for start in range(0, N, B):
        traker.featurize(batch=(x[start:start + B], y[start:start + B]), num_samples=B)
    if not finalize:
        return None
    traker.finalize_features()
    traker.start_scoring_checkpoint(exp_name="test", checkpoint=params, model_id=model_id,
                                    num_targets=M)
    traker.score(batch=target, num_samples=M)
    return traker.finalize_scores(exp_name="test")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data, linear_checkpoints):
    """A finished store (read-only for the tests: they copy it) and its scores."""
    folder = tmp_path_factory.mktemp("finished")
    scores = run(make(folder), linear_checkpoints[0], data)
    return folder, scores


def copy_of(finished, tmp_path):
    import shutil

    folder, scores = finished
    shutil.copytree(folder, tmp_path / "store")
    return tmp_path / "store", scores


# --- corrupted metadata ----------------------------------------------------------------------
@pytest.mark.parametrize("relpath, content, match", [
    ("store.json", "{\"format\": \"trax_attr.st", r"store.json' is not valid JSON.*backup"),
    ("store.json", "[1, 2]", r"does not hold a JSON object"),
    ("store.json", "{\"format\": \"other\", \"version\": 1}", r"not a trax_attr store"),
    ("models/0/meta.json", "\x00\x01garbage", r"meta.json' is not valid JSON.*Delete the folder"),
    ("models/0/meta.json", "{\"finalized\": true}", r"lacks a string 'fingerprint'"),
    ("experiments/test/meta.json", "{\"num_targets\": \"16\", \"model_ids\": [0]}",
     r"lacks an integer 'num_targets'"),
])
def test_corrupted_metadata_gives_a_clear_error(finished, tmp_path, linear_checkpoints,
                                                relpath, content, match):
    folder, _ = copy_of(finished, tmp_path)
    (folder / relpath).write_text(content)
    with pytest.raises(ValueError, match=match):
        traker = make(folder)
        traker.load_checkpoint(linear_checkpoints[0], model_id=0)
        traker.finalize_scores(exp_name="test")


# --- truncated and altered arrays -----------------------------------------------------------
def test_truncated_row_array_gives_a_clear_error_and_the_fix_works(tmp_path, data,
                                                                   linear_checkpoints):
    (x, y), _ = data
    traker = make(tmp_path)
    traker.load_checkpoint(linear_checkpoints[0], model_id=0)
    traker.featurize(batch=(x[:B], y[:B]), num_samples=B)
    grads = tmp_path / "models" / "0" / "grads.npy"
    os.truncate(grads, grads.stat().st_size // 2)
    with pytest.raises(ValueError, match=r"grads.npy' is not a readable .npy array.*truncated.*"
                                         r"Delete the folder"):
        traker.featurize(batch=(x[B:], y[B:]), num_samples=B)
    grads.unlink()  # a values file gone while its done flags remain: refused, not zeros
    with pytest.raises(ValueError, match=r"records finished rows but \['grads.npy'\]"):
        traker.featurize(batch=(x[B:], y[B:]), num_samples=B)
    import shutil
    shutil.rmtree(tmp_path / "models" / "0")  # the advised fix
    expected = run(make(tmp_path / "clean"), linear_checkpoints[0], data)
    np.testing.assert_array_equal(run(make(tmp_path), linear_checkpoints[0], data), expected)


@pytest.mark.parametrize("damage, match", [
    (lambda p: os.truncate(p, p.stat().st_size - 7), r"holds \d+ bytes, \d+ were recorded"),
    (lambda p: p.write_bytes(p.read_bytes()[:-4] + b"\x00\x00\x80\x7f"),
     r"does not match the checksum"),
])
def test_altered_finished_arrays_are_never_used(finished, tmp_path, damage, match):
    folder, scores = copy_of(finished, tmp_path)
    damage(folder / "models" / "0" / "inverse.npy")
    with pytest.raises(ValueError, match=r"inverse.npy of model_id=0 .*" + match):
        make(folder).finalize_scores(exp_name="test")
    damage(folder / "experiments" / "test" / "scores.npy")
    with pytest.raises(ValueError, match=r"scores of experiment 'test' .*" + match):
        Store(folder, {}).load_scores("test")


def test_crash_inside_finalize_features_never_leaves_a_used_half_array(
        tmp_path, data, linear_checkpoints, monkeypatch):
    params = linear_checkpoints[0]
    traker = make(tmp_path)
    run(traker, params, data, finalize=False)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # stands for a kill after half the rows

    monkeypatch.setattr(writes, "bytes_record", crash)  # the temp file is written
    with pytest.raises(KeyboardInterrupt):
        traker.finalize_features()
    folder = tmp_path / "models" / "0"
    assert not (folder / "inverse.npy").exists() and not list(folder.glob(".inverse*"))
    monkeypatch.undo()
    # now crash after the rename, before the record: inverse.npy exists, unrecorded
    real = store_module.write_json_atomic
    monkeypatch.setattr(store_module, "write_json_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        traker.finalize_features()
    monkeypatch.setattr(store_module, "write_json_atomic", real)
    assert (folder / "inverse.npy").exists() and not traker.finalized(0)
    with pytest.raises(ValueError, match=r"not finalized"):
        traker.store.finished(0, "inverse", (K, K), np.float32)
    traker.finalize_features()  # recomputes it
    traker.start_scoring_checkpoint(exp_name="test", checkpoint=params, model_id=0, num_targets=M)
    traker.score(batch=data[1], num_samples=M)
    expected = run(make(tmp_path / "clean"), params, data)
    np.testing.assert_array_equal(traker.finalize_scores(exp_name="test"), expected)


# --- paths and pickles ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../escape", "/etc", "a/b", "", ".hidden", "a..b", "x" * 129,
                                  7, None])
def test_experiment_names_that_escape_save_dir_are_refused(finished, tmp_path, name):
    folder, _ = copy_of(finished, tmp_path)
    with pytest.raises(ValueError, match=r"exp_name=.* is not a valid name"):
        make(folder).finalize_scores(exp_name=name)


def test_symbolic_links_out_of_save_dir_are_refused(finished, tmp_path):
    folder, _ = copy_of(finished, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (folder / "experiments" / "evil").symlink_to(outside)
    with pytest.raises(ValueError, match=r"outside save_dir .*remove the link"):
        make(folder).finalize_scores(exp_name="evil")
    os.rename(folder / "models" / "0", outside / "0")
    (folder / "models" / "0").symlink_to(outside / "0")
    with pytest.raises(ValueError, match=r"outside save_dir"):
        make(folder).finalize_scores(exp_name="test")


class _Bomb:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["TRAX_BOMB"]),))


def test_nothing_is_unpickled(finished, tmp_path, monkeypatch):
    folder, _ = copy_of(finished, tmp_path)
    bomb = tmp_path / "unpickled"
    monkeypatch.setenv("TRAX_BOMB", str(bomb))
    evil = np.array([_Bomb()] * 4, dtype=object)
    scores = folder / "experiments" / "test" / "scores.npy"
    np.save(scores, evil, allow_pickle=True)
    # even with a matching record (an attacker who also edits the metadata)
    meta_path = folder / "experiments" / "test" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["scores"].update(checksums.file_record(scores))
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"not a plain .npy array.*nothing is unpickled"):
        Store(folder, {}).load_scores("test")
    np.save(folder / "models" / "0" / "grads.npy", evil, allow_pickle=True)
    with pytest.raises(ValueError, match=r"grads.npy' is not a readable .npy array"):
        Store(folder, {}).model_arrays(0, N, K, mode="r")
    assert not bomb.exists()


def test_library_code_never_unpickles():
    """A scan of the package sources: no pickle, no allow_pickle=True, no bare torch.load."""
    root = Path(trax_attr.__file__).parent
    sources = list(root.rglob("*.py"))
    interop = root.parent / "interop"
    sources += list(interop.rglob("*.py")) if interop.exists() else []
    for path in sources:
        text = path.read_text()
        assert "import pickle" not in text and "allow_pickle=True" not in text, path
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, (path, line)


# --- locks and concurrent writers ------------------------------------------------------------
def test_conflicting_operations_are_refused_by_a_lock(tmp_path, data, linear_checkpoints):
    params = linear_checkpoints[0]
    (x, y), target = data
    traker = make(tmp_path)
    run(traker, params, data, finalize=False)
    other = Store(tmp_path, {})  # another process: flock locks are per open file
    with other.model_lock(0, shared=True, doing="featurize"):
        with pytest.raises(StoreBusyError, match=r"cannot finalize_features of model_id=0 .*"
                                                 r"another process is featurizing.*Wait"):
            traker.finalize_features()
        traker.featurize(batch=(x[:B], y[:B]), inds=np.arange(B))  # featurizers share
    with other.model_lock(0, shared=False, doing="finalize_features of"):
        with pytest.raises(StoreBusyError, match=r"cannot featurize model_id=0"):
            traker.featurize(batch=(x[:B], y[:B]), inds=np.arange(B))
    traker.finalize_features()
    traker.start_scoring_checkpoint(exp_name="test", checkpoint=params, model_id=0, num_targets=M)
    with other.experiment_lock("test", shared=True, doing="score"):
        with pytest.raises(StoreBusyError, match=r"cannot finalize_scores of experiment 'test'"):
            traker.finalize_scores(exp_name="test")
    with other.experiment_lock("test", shared=False, doing="finalize_scores of"):
        with pytest.raises(StoreBusyError, match=r"cannot score experiment 'test'"):
            traker.score(batch=target, num_samples=M)
    traker.score(batch=target, num_samples=M)
    assert np.isfinite(traker.finalize_scores(exp_name="test")).all()


def test_metadata_updates_from_many_writers_are_never_lost_or_torn(tmp_path):
    Store(tmp_path, {"a": 1})
    stop = threading.Event()
    errors = []

    def writer(index):
        store = Store(tmp_path, {"a": 1})  # own file descriptors, like another process
        for step in range(15):
            store.update_experiment_meta("exp", lambda meta: {
                "num_targets": 4, "model_ids": sorted(set((meta or {"model_ids": []})
                                                          ["model_ids"]) | {index * 100 + step})})

    def reader():
        path = tmp_path / "experiments" / "exp" / "meta.json"
        while not stop.is_set():
            if path.exists():
                try:
                    json.loads(path.read_text())
                except ValueError as err:  # a torn file
                    errors.append(err)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    watcher.join()
    assert not errors
    ids = Store(tmp_path, {}).experiment_meta("exp")["model_ids"]
    assert ids == sorted(i * 100 + s for i in range(4) for s in range(15))


# --- full disk, read-only and unwritable save_dir --------------------------------------------
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["fallocate", "flush", "json"])
def test_disk_full_gives_a_clear_error_and_the_store_stays_usable(
        finished, tmp_path, data, linear_checkpoints, monkeypatch, where):
    folder, expected = copy_of(finished, tmp_path)
    (x, y), _ = data
    traker = make(folder)
    traker.load_checkpoint(linear_checkpoints[1], model_id=1)
    if where == "flush":  # the first batch's arrays exist; the second batch's write fails
        traker.featurize(batch=(x[:B], y[:B]), num_samples=B)
    target = {"fallocate": (os, "posix_fallocate"), "flush": (np.memmap, "flush"),
              "json": (os, "fsync")}[where]
    monkeypatch.setattr(*target, _enospc)
    with pytest.raises(StoreWriteError, match=r"the device is full.*Nothing already stored was "
                                              r"changed") as info:
        if where == "json":
            traker.store.update_experiment_meta("test", lambda meta: {**meta, "x": 1})
        else:
            traker.featurize(batch=(x[B:], y[B:]), inds=np.arange(B, N))
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    # readable, unchanged, and the run resumes
    np.testing.assert_array_equal(Store(folder, {}).load_scores("test"), expected)
    assert "x" not in Store(folder, {}).experiment_meta("test")
    assert not [p for p in folder.rglob(".*") if p.suffix in (".tmp", ".partial")]
    done = Store(folder, {}).model_arrays(1, N, K, mode="r")["done"] if where == "flush" else None
    if done is not None:
        assert done[B:].sum() == 0  # the failed batch is not marked done
    run(make(folder), linear_checkpoints[1], data, model_id=1, finalize=False)
    make(folder).finalize_features()


def test_save_dir_under_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"is a file, not a folder"):
        make(tmp_path / "file")
    with pytest.raises(StoreWriteError, match=r"a parent of save_dir is a file"):
        make(tmp_path / "file" / "store")


def test_unwritable_save_dir_is_a_clear_error(tmp_path, monkeypatch):
    """As root, chmod does not stop writes, so permission denied is simulated."""
    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(StoreWriteError, match=r"could not write the store folder .*permission "
                                              r"denied.*fix the permissions of save_dir"):
        make(tmp_path / "new")


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 512 KiB tmpfs: a real full disk, and remountable read-only (needs mount rights)."""
    mountpoint = tmp_path / "tmpfs"
    mountpoint.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs",
                             str(mountpoint)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}); the monkeypatched "
                    "ENOSPC tests cover the same code paths")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_real_full_and_read_only_filesystem(tiny_tmpfs, data, linear_checkpoints):
    expected = run(make(tiny_tmpfs / "small"), linear_checkpoints[0], data)
    big = make(tiny_tmpfs / "big", n=16384)  # grads alone: 16384 x 16 x 4 = 1 MiB > 512 KiB
    big.load_checkpoint(linear_checkpoints[0], model_id=0)
    (x, y), _ = data
    with pytest.raises(StoreWriteError, match=r"the device is full") as info:
        big.featurize(batch=(x[:B], y[:B]), num_samples=B)
    assert info.value.errno == errno.ENOSPC
    np.testing.assert_array_equal(Store(tiny_tmpfs / "small", {}).load_scores("test"), expected)
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_tmpfs)], check=True)
    # running as root, chmod would not stop writes; a read-only mount does
    reopened = make(tiny_tmpfs / "small")
    np.testing.assert_array_equal(reopened.store.load_scores("test"), expected)
    reopened.load_checkpoint(linear_checkpoints[0], model_id=0)  # nothing to write: fine
    with pytest.raises(StoreWriteError, match=r"read-only") as info:
        reopened.load_checkpoint(linear_checkpoints[1], model_id=1)
    assert info.value.errno == errno.EROFS
