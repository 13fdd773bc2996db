"""Store hardening: nothing on disk makes trax_attr return wrong scores, hang,
or read outside save_dir. One regression test per item of the issue, named after it."""

import errno
import json
import os
import stat
import subprocess
import threading
import time
import traceback
import warnings

import numpy as np
import pytest

import trax_attr
from store_faults import (B, K, M, N, cli_in_subprocess, copy_store, deadline, featurize,
                          flip_bit, make, npy_offset, run, score)
from trax_attr import cli
from trax_attr.hashing import digest
from trax_attr.store import Store, StoreCorruptedError, StoreWriteError
from trax_attr.store import checksums, reading


@pytest.fixture(scope="module")
def data(digits):
    x, y = digits
    return (x[:N], y[:N]), (x[1500:1500 + M], y[1500:1500 + M])


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data, linear_checkpoints):
    """A finished store of one checkpoint (the tests copy it) and its scores."""
    folder = tmp_path_factory.mktemp("finished")
    return folder, run(make(folder), linear_checkpoints[:1], data)


@pytest.fixture
def store(finished, tmp_path):
    """A copy of the finished store: (folder, clean scores)."""
    folder, scores = finished
    return copy_store(folder, tmp_path / "store"), scores


def cli_run(capsys, *argv):
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


# --- 1. store.json lost or edited ------------------------------------------------------------
def test_item_01_lost_or_edited_store_json_is_refused_and_repair_restores_it(
        tmp_path, data, linear_checkpoints, store, capsys):
    params = linear_checkpoints[:1]
    # featurized, store.json deleted, resumed with another seed: refused, not re-created
    half = tmp_path / "half"
    featurize(make(half), params[0], data[0])
    (half / "store.json").unlink()
    with pytest.raises(StoreCorruptedError, match=r"holds models/ but no store.json.*Restore "
                                                  r"store.json.*trax-attr repair"):
        run(make(half, seed=5), params, data)
    assert not (half / "store.json").exists()
    # seed edited in store.json (with the seed given again): refused
    edited = tmp_path / "edited"
    featurize(make(edited), params[0], data[0])
    meta = json.loads((edited / "store.json").read_text())
    meta["config"]["seed"] = 7
    (edited / "store.json").write_text(json.dumps(meta))
    with pytest.raises(StoreCorruptedError, match=r"store.json' were changed after it was "
                                                  r"written"):
        run(make(edited, seed=7), params, data)
    # ... and with its digest forged too: every checkpoint's own stamp refuses it
    meta["settings"]["digest"] = digest(
        {key: meta["config"][key] for key in meta["settings"]["keys"]})
    (edited / "store.json").write_text(json.dumps(meta))
    with pytest.raises(StoreCorruptedError, match=r"models/0/meta.json' was written with "
                                                  r"other settings"):
        run(make(edited, seed=7), params, data)
    # a finalized store without store.json: a clear error, and `trax-attr repair` fixes it
    folder, expected = store
    (folder / "store.json").unlink()
    with pytest.raises(StoreCorruptedError, match=r"holds models/ and experiments/ but no "
                                                  r"store.json"):
        make(folder)
    status, out, err = cli_run(capsys, "info", str(folder))
    assert status == 2 and "no store.json" in err and err.count("\n") == 1
    status, out, err = cli_run(capsys, "repair", str(folder))
    assert status == 0 and "rewrote" in out, err
    np.testing.assert_array_equal(make(folder).finalize_scores(exp_name="test"), expected)
    with pytest.raises(ValueError, match=r"other settings"):  # the repaired settings hold
        make(folder, seed=5)
    # every checkpoint and experiment carries Settings.digest()
    settings = make(tmp_path / "fresh").settings
    for meta_path in ("models/0/meta.json", "experiments/test/meta.json"):
        stamp = json.loads((folder / meta_path).read_text())["settings"]
        assert stamp["digest"] == settings.digest()


# --- 2. links out of save_dir ------------------------------------------------------------------
@pytest.mark.parametrize("relpath", ["experiments/test/scores.npy", "experiments/test/meta.json",
                                     "store.json", "models/0/meta.json", "models/0/grads.npy",
                                     "models/0/inverse.npy", "experiments/test/0_targets.npy"])
def test_item_02_no_file_is_read_through_a_link_out_of_save_dir(store, tmp_path, relpath):
    folder, expected = store
    outside = tmp_path / "outside" / relpath.replace("/", "_")
    outside.parent.mkdir()
    os.replace(folder / relpath, outside)  # an identical file, but outside save_dir
    (folder / relpath).symlink_to(outside)
    opened = []
    real_open = os.open

    def watch(path, *args, **kwargs):
        if os.path.realpath(path) == str(outside):
            opened.append(path)
        return real_open(path, *args, **kwargs)

    os.open = watch
    try:
        with pytest.raises(StoreCorruptedError, match=r"outside save_dir|symbolic link"):
            Store(folder, {}).load_scores("test")
            make(folder).finalize_scores(exp_name="test")
    finally:
        os.open = real_open
    assert not opened, opened
    # a link inside save_dir is refused too: no store file is read through any link
    (folder / relpath).unlink()
    inside = folder / f"{relpath.replace('/', '_')}.copy"
    os.replace(outside, inside)
    (folder / relpath).symlink_to(inside)
    with pytest.raises(StoreCorruptedError, match=r"symbolic link"):
        Store(folder, {}).load_scores("test")
        make(folder).finalize_scores(exp_name="test")


# --- 3. special files --------------------------------------------------------------------------
def _load(folder):
    return Store(folder, {}).load_scores("test")


def _finalize(folder):
    return make(folder).finalize_scores(exp_name="test")


@pytest.mark.parametrize("relpath, special, call", [
    ("models/0/meta.json", "/dev/zero", "info"),
    ("models/0/meta.json", "fifo", "info"),
    ("models/0/meta.json", "fifo", _finalize),
    ("models/0/done.npy", "fifo", "info"),
    ("experiments/test/meta.json", "fifo", "info"),
    ("experiments/test/0_done.npy", "fifo", _finalize),
    ("experiments/test/scores.npy", "/dev/zero", _load),
    ("experiments/test/scores.npy", "fifo", _load),
    ("models/0/grads.npy", "fifo", _finalize),
])
def test_item_03_special_files_are_refused_without_hanging_or_eating_memory(store, relpath, special,
                                                                      call):
    folder, _ = store
    path = folder / relpath
    path.unlink()
    if special == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(special)
    match = "is a FIFO" if special == "fifo" else "symbolic link"
    if call == "info":  # in a child with 3 GiB of address space and a time limit
        status, out, err = cli_in_subprocess("info", str(folder), timeout=120)
        assert status == 2 and match in err and "Traceback" not in err, (status, err[-2000:])
    else:
        with deadline(30), pytest.raises(StoreCorruptedError, match=match):
            call(folder)


def test_item_03_metadata_larger_than_its_cap_is_not_read(store, monkeypatch):
    folder, _ = store
    meta = folder / "experiments" / "test" / "meta.json"
    monkeypatch.setattr(reading, "JSON_MAX_BYTES", meta.stat().st_size - 1)
    with pytest.raises(StoreCorruptedError, match=r"more than the \d+ any metadata"):
        Store(folder, {}).load_scores("test")


# --- 4. a reader during a re-finalize -------------------------------------------------------------
def test_item_04_a_reader_sees_the_old_or_the_new_scores_never_a_false_alarm(store):
    folder, first = store
    second = first + 1.0
    stop, errors, loads = threading.Event(), [], [0]

    def refinalize():  # another process finalizing the same experiment again and again
        writer = Store(folder, {})
        info = writer.experiment_meta("test")["scores"]
        info = {"model_ids": info["model_ids"], "lambda": info["lambda"]}
        i = 0
        while not stop.is_set():
            with writer.experiment_lock("test", shared=False, doing="finalize_scores of"):
                writer.save_scores("test", (first, second)[i % 2], info)
            i += 1

    thread = threading.Thread(target=refinalize)
    thread.start()
    reader = Store(folder, {})
    try:
        end = time.monotonic() + 3
        while time.monotonic() < end:
            try:
                got = reader.load_scores("test")
            except ValueError as err:
                errors.append(str(err)[:120])
                continue
            loads[0] += 1
            assert np.array_equal(got, first) or np.array_equal(got, second)
    finally:
        stop.set()
        thread.join()
    assert loads[0] > 20 and not errors, (loads, errors[:3], len(errors))


def test_item_04_a_reader_of_the_inverse_during_a_refinalize_with_another_lambda(store):
    folder, _ = store
    stop, errors, reads = threading.Event(), [], [0]

    def refinalize():
        traker = make(folder)
        i = 0
        while not stop.is_set():
            traker.finalize_features(lambda_reg=(0.5, 1e-2)[i % 2])
            i += 1

    thread = threading.Thread(target=refinalize)
    thread.start()
    reader = Store(folder, {})
    try:
        end = time.monotonic() + 3
        while time.monotonic() < end:
            try:
                np.asarray(reader.finished(0, "inverse", (K, K), np.float32))
                reads[0] += 1
            except ValueError as err:
                errors.append(str(err)[:120])
    finally:
        stop.set()
        thread.join()
    assert reads[0] > 20 and not errors, (reads, errors[:3], len(errors))


# --- 5. values without checksums -------------------------------------------------------------------
def test_item_05_a_flipped_bit_in_finished_targets_is_caught(store):
    folder, _ = store
    targets = folder / "experiments" / "test" / "0_targets.npy"
    flip_bit(targets, npy_offset(targets) + 4 * 5 + 3, 6)  # an exponent bit of one float
    with pytest.raises(StoreCorruptedError, match=r"targets of model_id=0 in experiment 'test'"
                                                  r".*does not match the checksum.*score"):
        make(folder).finalize_scores(exp_name="test")


@pytest.mark.parametrize("name, byte, bit", [("grads", 3, 6), ("grads", 0, 0),
                                             ("out_to_loss", 2, 7), ("done", 0, 0)])
def test_item_05_damage_to_rows_being_written_is_caught_at_finalize(
        tmp_path, data, linear_checkpoints, name, byte, bit):
    (x, y), _ = data
    traker = make(tmp_path)
    traker.load_checkpoint(linear_checkpoints[0], model_id=0)
    rows = np.arange(N) if name != "done" else np.delete(np.arange(N), 32)
    for start in range(0, len(rows), B):
        inds = rows[start:start + B]
        traker.featurize(batch=(x[inds], y[inds]), inds=inds)
    path = tmp_path / "models" / "0" / f"{name}.npy"
    if name == "done":  # row 32 was never written: marked done, its zeros fail their check
        flip_bit(path, npy_offset(path) + 32, 0)
        bad = 32
    else:  # one bit of row 7
        flip_bit(path, npy_offset(path) + 4 * (K if name == "grads" else 1) * 7 + byte, bit)
        bad = 7
    with pytest.raises(StoreCorruptedError, match=rf"training rows of model_id=0: rows \[{bad}\]"
                                                  r".*do not match the checks"):
        traker.finalize_features()


def test_item_05_rescoring_rows_of_recorded_targets_is_not_a_false_alarm(store, data,
                                                                   linear_checkpoints):
    folder, expected = store
    traker = make(folder)
    done = traker.store.target_arrays("test", 0, M, K)["done"]
    done[3] = 0  # a target to do again (a done flag lost): recomputed, not "corrupted"
    done.flush()
    traker.load_checkpoint(linear_checkpoints[0], model_id=0)
    score(traker, linear_checkpoints[0], data[1])
    got = traker.finalize_scores(exp_name="test")
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


# --- 6. names --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["e\n", "test\n", "a\x00", "é"])
def test_item_06_names_are_matched_whole(store, linear_checkpoints, name):
    folder, _ = store
    traker = make(folder)
    with pytest.raises(ValueError, match=r"is not a valid name"):
        traker.start_scoring_checkpoint(exp_name=name, checkpoint=linear_checkpoints[0],
                                        model_id=0, num_targets=M)
    with pytest.raises(ValueError, match=r"is not a valid name"):
        traker.finalize_scores(exp_name=name)
    assert not [p for p in (folder / "experiments").iterdir() if p.name != "test"]


# --- 7. the CLI on a corrupted store ---------------------------------------------------------------
def _object_scores(folder):
    path = folder / "experiments" / "test" / "scores.npy"
    np.save(path, np.array([1, "x"], dtype=object), allow_pickle=True)
    meta_path = folder / "experiments" / "test" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["scores"].update(checksums.file_record(path))
    meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize("damage, command", [
    (lambda f: flip_bit(f / "experiments/test/scores.npy", 200, 2), "top"),
    (_object_scores, "top"),
    (_object_scores, "compare"),
    (lambda f: (f / "models/0/meta.json").write_text("garbage"), "info"),
    (lambda f: (f / "models/0/meta.json").write_text('{"fingerprint": 1}'), "info"),
    (lambda f: os.truncate(f / "models/0/done.npy", 100), "info"),
    (lambda f: (f / "experiments/test/meta.json").write_text('{"num_targets": []}'), "info"),
])
def test_item_07_every_store_error_reaching_the_cli_is_one_line_and_status_2(store, capsys, damage,
                                                                      command):
    folder, _ = store
    damage(folder)
    argv = {"info": ["info", str(folder)],
            "top": ["top", str(folder), "--exp", "test", "--target", "0"],
            "compare": ["compare", str(folder), str(folder), "--exp", "test"]}[command]
    status, out, err = cli_run(capsys, *argv)
    assert status == 2, (status, err)
    assert err.startswith("trax-attr: error: ") and err.count("\n") == 1, err


# --- 8. info counts rows, not flag values ------------------------------------------------------------
def test_item_08_info_counts_zeroed_rows_once(tmp_path, data, linear_checkpoints, capsys):
    (x, y), _ = data
    x = x.copy()
    x[[3, 40], 0] = np.nan
    traker = make(tmp_path, nonfinite="zero")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", trax_attr.NonFiniteWarning)
        featurize(traker, linear_checkpoints[0], (x, y))
    assert traker.zeroed_rows(0).tolist() == [3, 40]
    status, out, err = cli_run(capsys, "info", str(tmp_path))
    assert status == 0 and f"model 0: {N}/{N} rows featurized" in out, out


# --- 9. modes honour the umask ---------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_item_09_files_honour_the_umask(tmp_path, data, linear_checkpoints, umask):
    previous = os.umask(umask)
    try:
        run(make(tmp_path), linear_checkpoints[:1], data)
    finally:
        os.umask(previous)
    want = 0o666 & ~umask
    for path in ["store.json", "models/0/meta.json", "models/0/grads.npy",
                 "models/0/inverse.npy", "experiments/test/meta.json",
                 "experiments/test/scores.npy", "locks/meta.lock"]:
        assert stat.S_IMODE((tmp_path / path).stat().st_mode) == want, path


# --- 10. batches ------------------------------------------------------------------------------------
def test_item_10_batches_are_converted_and_checked_naming_the_array(tmp_path, data,
                                                               linear_checkpoints):
    (x, y), _ = data
    params = linear_checkpoints[0]
    lists, arrays = make(tmp_path / "lists"), make(tmp_path / "arrays")
    for traker in (lists, arrays):
        traker.load_checkpoint(params, model_id=0)
    lists.featurize(batch=(x[:8].tolist(), y[:8].tolist()), num_samples=8)
    arrays.featurize(batch=(x[:8], y[:8]), num_samples=8)
    np.testing.assert_array_equal(lists.train_features(0), arrays.train_features(0))

    def refused(batch, match):
        with pytest.raises(ValueError, match=match) as info:
            lists.featurize(batch=batch, num_samples=len(batch[0]))
        frames = traceback.extract_tb(info.tb)
        assert len(frames) <= 6, [f.name for f in frames]  # raised near the user's call

    refused((x[8:16],), r"batch holds 1 arrays, but ImageClassification.get_output takes 2")
    refused((x[8:16], y[8:16], y[8:16]), r"batch holds 3 arrays")
    refused((x[8:16, :60], y[8:16]), r"model cannot run on this batch \(batch\[0\] "
                                     r"float32\[8, 60\].*batch\[0\] has per-example shape \[60\] "
                                     r"where the first batch had \[64\]")
    refused((x[8:16].reshape(8, 8, 8), y[8:16]), r"batch\[0\] has per-example shape \[8, 8\] "
                                                 r"where the first batch had \[64\]")
    refused(((x[8:16] * 16).astype(np.uint8), y[8:16]), r"batch\[0\] holds integer values "
                                                       r"\(uint8\) where the first batch held "
                                                       r"floating")
    lists.featurize(batch=(x[8:16], y[8:16]), num_samples=8)  # the cursor did not move


# --- 11. non-finite weights ----------------------------------------------------------------------------
@pytest.mark.parametrize("nonfinite", ["raise", "zero"])
def test_item_11_nonfinite_weights_are_refused_at_load_naming_the_leaf(tmp_path, linear_checkpoints,
                                                                  nonfinite):
    params = {name: np.array(value) for name, value in linear_checkpoints[0].items()}
    params["w"][3, 4] = np.nan
    traker = make(tmp_path, nonfinite=nonfinite)
    with pytest.raises(ValueError, match=r"model_id=0 holds NaN or Inf in parameter \['w'\] "
                                         r"\(1 of 640 values, e\.g\. at index \(3, 4\)\)"):
        traker.load_checkpoint(params, model_id=0)
    params["w"][3, 4], params["b"][2] = 0.0, np.inf
    with pytest.raises(ValueError, match=r"parameter \['b'\]"):
        traker.load_checkpoint(params, model_id=0)


def test_item_11_state_may_hold_inf_but_not_nan():
    """A state entry (buffer) may hold ±Inf, as attention masks do; NaN is refused."""
    from trax_attr.batches import check_finite_weights

    params = {"w": np.ones((2, 2), np.float32)}
    mask = np.triu(np.full((4, 4), -np.inf, np.float32), 1)
    check_finite_weights(params, {"attn_mask": mask}, 0)
    mask[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"holds NaN in state entry \['attn_mask'\] \(1 of 16"):
        check_finite_weights(params, {"attn_mask": mask}, 0)


# --- 12. ranges of model_id and seed ---------------------------------------------------------------------
@pytest.mark.parametrize("model_id", [2**32, -1, 1.5, "3", True, None])
def test_item_12_model_id_is_range_checked(tmp_path, linear_checkpoints, model_id):
    traker = make(tmp_path)
    with pytest.raises(ValueError, match=r"model_id must be a non-negative integer up to "
                                         r"4294967295"):
        traker.load_checkpoint(linear_checkpoints[0], model_id=model_id)
    with pytest.raises(ValueError, match=r"up to 4294967295"):
        traker.store.model_dir(model_id)


@pytest.mark.parametrize("seed", [2**32, 2**64, -1, 1.5, "3", True])
def test_item_12_seed_is_range_checked(tmp_path, seed):
    with pytest.raises(ValueError, match=r"seed must be a non-negative integer up to "
                                         r"4294967295"):
        make(tmp_path, seed=seed)
    assert not (tmp_path / "store.json").exists()


# --- 13. model_ids of finalize_scores ----------------------------------------------------------------------
def test_item_13_model_ids_are_distinct_ids_or_one_id(store):
    folder, expected = store
    traker = make(folder)
    with pytest.raises(ValueError, match=r"names a checkpoint twice"):
        traker.finalize_scores(exp_name="test", model_ids=[0, 0, 1])
    for ids in (0, np.int64(0), [0]):
        np.testing.assert_array_equal(traker.finalize_scores(exp_name="test", model_ids=ids),
                                      expected)


# --- 14. sizes and full disks ------------------------------------------------------------------------------
@pytest.mark.parametrize("n, error, match", [
    (2**40, StoreWriteError, r"could not write a new array .*grads.npy.*the device is full "
                             r".*bytes are needed"),
    (2**40 + 1, ValueError, r"train_set_size must be a positive integer up to 1099511627776"),
    (2**62, ValueError, r"train_set_size must be a positive integer up to 1099511627776"),
])
def test_item_14_huge_train_set_sizes_give_the_store_errors(tmp_path, data, linear_checkpoints, n,
                                                       error, match):
    with pytest.raises(error, match=match) as info:
        traker = make(tmp_path, n=n)
        featurize(traker, linear_checkpoints[0], data[0])
    if error is StoreWriteError:
        assert info.value.errno == errno.ENOSPC
        assert not list((tmp_path / "models" / "0").glob("*.npy"))


def test_item_14_a_full_disk_while_scores_are_written_is_a_store_error(store, monkeypatch):
    folder, expected = store
    traker = make(folder)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(StoreWriteError, match=r"scores.npy.*the device is full") as info:
        traker.finalize_scores(exp_name="test")
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    np.testing.assert_array_equal(Store(folder, {}).load_scores("test"), expected)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 4 MiB tmpfs (needs mount rights)."""
    mountpoint = tmp_path / "tmpfs"
    mountpoint.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mountpoint)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}); "
                    "test_14_a_full_disk_while_scores_are_written_is_a_store_error injects "
                    "ENOSPC on the same path")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_item_14_a_real_4mib_device_filling_up_during_finalize_scores(small_tmpfs, finished):
    folder = copy_store(finished[0], small_tmpfs / "store")
    expected = finished[1]
    filler = small_tmpfs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:  # fill the device to its last block
        while os.write(fd, b"\1" * 4096):
            pass
    except OSError as err:
        assert err.errno == errno.ENOSPC
    finally:
        os.close(fd)
    with pytest.raises(StoreWriteError, match=r"the device is full") as info:
        make(folder).finalize_scores(exp_name="test")
    assert info.value.errno == errno.ENOSPC
    np.testing.assert_array_equal(Store(folder, {}).load_scores("test"), expected)
    assert not [p for p in folder.rglob(".*") if p.suffix in (".tmp", ".partial")]
    filler.unlink()
    np.testing.assert_array_equal(make(folder).finalize_scores(exp_name="test"), expected)


# --- beyond the fourteen: λ bound to its inverse ------------------------------------------------
def test_an_edited_lambda_never_keeps_an_inverse_of_another_lambda(store):
    folder, expected = store
    path = folder / "models" / "0" / "meta.json"
    meta = json.loads(path.read_text())
    assert meta["arrays"]["inverse.npy"]["lambda"] == meta["lambda"]  # bound when written
    meta["lambda"] = {**meta["lambda"], "lambda_reg": 5.0}
    path.write_text(json.dumps(meta))
    traker = make(folder)
    match = r"records lambda=.*'lambda_reg': 5.0.*but inverse.npy was written for lambda="
    with pytest.raises(StoreCorruptedError, match=match):  # would keep the inverse of λ = 0.01
        traker.finalize_features(lambda_reg=5.0)
    with pytest.raises(StoreCorruptedError, match=match):  # would report λ = 5
        traker.finalize_scores(exp_name="test")
    meta["lambda"]["lambda_reg"] = meta["arrays"]["inverse.npy"]["lambda"]["lambda_reg"]
    path.write_text(json.dumps(meta))  # restored: as before
    np.testing.assert_array_equal(make(folder).finalize_scores(exp_name="test"), expected)


# --- the documentation -------------------------------------------------------------------------------
def test_every_test_named_in_docs_guarantees_exists():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    text = (root / "docs" / "guarantees.md").read_text()
    named, current = [], None
    for path, name in re.findall(r"`(tests/[\w/]+\.py)?::(\w+)`", text):
        current = path or current
        named.append((current, name))
    assert len(named) > 30
    for path, name in named:
        assert re.search(rf"^def {name}\(", (root / path).read_text(), re.M), (path, name)
