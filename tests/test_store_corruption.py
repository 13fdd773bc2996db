"""Property: whatever is done to the files of a finished store (a byte flipped, a file
truncated, deleted, swapped with its twin of another checkpoint, replaced by a link, a
FIFO or a folder, a JSON value edited), every later call either raises one of the store's
documented errors (ValueError, StoreCorruptedError among them; StoreBusyError;
StoreWriteError) within seconds, or returns the scores of the clean run. Never other
scores, never a hang.

The calls, in the order a user makes them: ``Store.load_scores``, a reopened TRAKer's
``finalize_scores``, the whole script resumed (load, featurize what is missing, finalize,
score, finalize_scores), ``trax-attr info``, and ``load_scores`` again.

``TRAX_CORRUPTION_EXAMPLES=N`` runs N examples instead of a few (a long run by hand), and
``TRAX_CORRUPTION_REPORT=path.json`` writes what was tried and what happened.
"""

import collections
import contextlib
import io
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from store_faults import M, N, deadline, make, run
from trax_attr import cli
from trax_attr.store import Store, StoreBusyError, StoreWriteError

EXAMPLES = int(os.environ.get("TRAX_CORRUPTION_EXAMPLES", "8"))
DOCUMENTED = (ValueError, StoreBusyError, StoreWriteError)  # StoreCorruptedError: a ValueError
SECONDS = 60  # per call; a clean call takes well under a second once compiled
KINDS = ("flip", "truncate", "delete", "swap", "link_outside", "link_inside", "link_devzero",
         "fifo", "folder", "edit_json", "folder_outside")
TALLY = {"examples": 0, "damages": collections.Counter(), "outcomes": collections.Counter()}


@pytest.fixture(scope="module")
def clean(tmp_path_factory, digits, linear_checkpoints):
    """A finished store of two checkpoints, its scores, its files and folders."""
    x, y = digits
    data = (x[:N], y[:N]), (x[1500:1500 + M], y[1500:1500 + M])
    folder = tmp_path_factory.mktemp("clean")
    scores = run(make(folder), linear_checkpoints, data)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    folders = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_dir())
    yield _Clean((folder, scores, files, folders, data, linear_checkpoints))


def _write_report() -> None:
    """Write the tally so far to ``TRAX_CORRUPTION_REPORT`` (after every example, so a long
    run stopped early still says what it tried)."""
    report = os.environ.get("TRAX_CORRUPTION_REPORT")
    if report:
        Path(report).write_text(json.dumps(
            {"examples": TALLY["examples"], "damages": dict(TALLY["damages"]),
             "outcomes": {" | ".join(k): v for k, v in sorted(TALLY["outcomes"].items())}},
            indent=1))


class _Clean(tuple):
    def __repr__(self):  # hypothesis prints the arguments of a failing example
        return "<clean store>"


json_values = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                        st.lists(st.integers(-3, 3), max_size=3),
                        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                        st.just("delete"), st.just("+1"))
damages = st.tuples(st.sampled_from(KINDS), st.integers(0, 2**31), st.integers(0, 2**31),
                    st.integers(0, 7), json_values)


def _leaves(value, path=()):
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, path + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _leaves(item, path + (i,))


def _edit(data, path, new):
    if not path:
        return new if new not in ("delete", "+1") else []
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if new == "delete":
        del parent[key]
    elif new == "+1":
        old = parent[key]
        parent[key] = old + 1 if isinstance(old, (int, float)) and not isinstance(
            old, bool) else [old]
    else:
        parent[key] = new
    return data


def damage(folder: Path, outside: Path, clean, kind, pick, where, bit, value) -> str:
    """Apply one damage; a short description of it."""
    _, _, files, folders, _, _ = clean
    if kind == "folder_outside":
        name = folders[pick % len(folders)]
        if (folder / name).is_symlink() or not (folder / name).exists():
            return f"{kind} {name} (gone, or a link already)"
        target = outside / f"moved_{pick}_{len(list(outside.iterdir()))}"  # a new name
        shutil.move(folder / name, target)
        (folder / name).symlink_to(target)
        return f"{kind} {name}"
    if kind == "edit_json":
        candidates = [f for f in files if f.endswith(".json")]
    else:
        candidates = files
    name = candidates[pick % len(candidates)]
    path = folder / name
    if not path.is_file():  # gone, or a FIFO, a folder, a dangling link by an earlier step
        return f"{kind} {name} (not a file any more)"
    size = path.stat().st_size
    if kind == "flip" and size:
        data = bytearray(path.read_bytes())
        data[where % size] ^= 1 << bit
        path.write_bytes(bytes(data))
    elif kind == "truncate" and size:
        os.truncate(path, where % size)
    elif kind == "delete":
        path.unlink()
    elif kind == "swap":
        parts = Path(name).parts
        twin = None
        if len(parts) == 3 and parts[0] == "models":
            twin = Path("models", "1" if parts[1] == "0" else "0", parts[2])
        elif len(parts) == 3 and parts[0] == "experiments" and parts[2][:2] in ("0_", "1_"):
            twin = Path(*parts[:2], ("1_" if parts[2][0] == "0" else "0_") + parts[2][2:])
        if twin is None or not (folder / twin).is_file():
            twin = Path(files[where % len(files)])
        if (folder / twin).is_file() and twin != Path(name):
            tmp = path.with_name(".swap")
            os.replace(path, tmp)
            os.replace(folder / twin, path)
            os.replace(tmp, folder / twin)
            name = f"{name}<->{twin}"
    elif kind in ("link_outside", "link_inside"):
        if path.is_symlink():  # a link already (an earlier step): nothing new to link
            return f"{kind} {name} (a link already)"
        target = (outside if kind == "link_outside" else folder) / f"copy_{pick}"
        shutil.copy(path, target)
        path.unlink()
        path.symlink_to(target)
    elif kind == "link_devzero":
        path.unlink()
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        path.unlink()
        os.mkfifo(path)
    elif kind == "folder":
        path.unlink()
        path.mkdir()
    elif kind == "edit_json":
        try:
            data = json.loads(path.read_text())
        except ValueError:
            return f"{kind} {name} (not JSON any more)"
        leaves = list(_leaves(data))
        where_ = leaves[where % len(leaves)]
        data = _edit(data, where_, value)
        path.write_text(json.dumps(data))
        name = f"{name}:{'.'.join(map(str, where_))}={value!r}"[:120]
    return f"{kind} {name}"


def _outcome(call, clean_scores, exact):
    """What a call did: 'equal' or the name of a documented error; fails on anything else."""
    try:
        with deadline(SECONDS), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = call()
    except DOCUMENTED as err:
        return type(err).__name__
    if result is None or isinstance(result, str):
        return result or "ok"
    if exact:
        np.testing.assert_array_equal(result, clean_scores)
    else:  # rows recomputed in another batch composition: float32 rounding
        np.testing.assert_allclose(result, clean_scores, rtol=1e-5,
                                   atol=1e-5 * np.abs(clean_scores).max())
    return "equal"


def _info(folder):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(["info", str(folder)])
    assert status in (0, 2), status
    if status == 2:
        text = err.getvalue()
        assert text.startswith("trax-attr: error: ") and text.count("\n") == 1, text
        return "error line"
    return None


@settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 8,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(steps=st.lists(damages, min_size=1, max_size=2))
def test_any_damage_gives_a_documented_error_or_the_clean_scores(clean, steps):
    source, scores, _, _, data, checkpoints = clean
    work = Path(tempfile.mkdtemp(prefix="trax_corrupt_"))
    try:
        folder, outside = work / "store", work / "outside"
        shutil.copytree(source, folder)
        outside.mkdir()
        done = [damage(folder, outside, clean, *step) for step in steps]
        kinds = " + ".join(sorted(step[0] for step in steps))
        calls = [("load_scores", lambda: Store(folder, {}).load_scores("test"), True),
                 ("finalize_scores", lambda: make(folder).finalize_scores(exp_name="test"),
                  True),
                 ("resumed script", lambda: run(make(folder), checkpoints, data), False),
                 ("trax-attr info", lambda: _info(folder), True),
                 ("load_scores after", lambda: Store(folder, {}).load_scores("test"), False)]
        TALLY["examples"] += 1
        for kind in (step[0] for step in steps):
            TALLY["damages"][kind] += 1
        for name, call, exact in calls:
            try:
                outcome = _outcome(call, scores, exact)
            except BaseException as err:
                raise AssertionError(f"after {done}, {name} gave {type(err).__name__}: "
                                     f"{str(err)[:500]}") from err
            TALLY["outcomes"][(kinds, name, outcome)] += 1
        _write_report()
    finally:
        shutil.rmtree(work, ignore_errors=True)
