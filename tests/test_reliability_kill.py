"""Faults across processes: kill -9 at many points, and two processes in one save_dir."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import _trak_job as job

JOB = str(Path(__file__).with_name("_trak_job.py"))
ROOT = str(Path(__file__).resolve().parents[1])


def _env(cache_dir=None):
    env = dict(os.environ)
    if cache_dir is not None:  # the children share compilations (test speed only)
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["PYTHONPATH"] = os.path.join(ROOT, "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def _start(save_dir, setup, phase, kill_at):
    data_path, cache_dir = setup
    return subprocess.Popen([sys.executable, JOB, str(save_dir), str(data_path), phase,
                             str(kill_at)],
                            env=_env(cache_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Scores of one uninterrupted run, and how many store events each phase makes."""
    events = dict.fromkeys(job.PHASES, 0)

    def on_event(phase):
        if phase is not None:
            events[phase] += 1

    mp = pytest.MonkeyPatch()
    try:
        for owner, name, value in job.count_events(on_event):
            mp.setattr(owner, name, value)
        folder = tmp_path_factory.mktemp("job")
        job.write_data(folder / "digits.npz")
        scores = job.run(folder / "clean", folder / "digits.npz")
    finally:
        mp.undo()
    return scores, events, (folder / "digits.npz", folder / "jax_cache")


def test_kill9_in_every_phase_then_resume_gives_identical_scores(reference, tmp_path):
    """SIGKILL at random store events of featurize (twice), finalize_features, score
    (twice) and finalize_scores (between a row's values and its done flag, between a
    finished array's rename and its record, ...), and twice at random moments; the
    resumed run's scores equal the uninterrupted run's."""
    expected, events, setup = reference
    rng = np.random.default_rng(7)
    plan = ["featurize", "featurize", "finalize_features", "score", "score", "finalize_scores"]
    killed = []
    for phase in plan:
        # a resumed phase has less left to do: aim in the first half of its events
        at = int(rng.integers(1, max(2, events[phase] // 2)))
        proc = _start(tmp_path, setup, phase, at)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode in (0, -signal.SIGKILL), err[-3000:]
        if proc.returncode == -signal.SIGKILL:
            killed.append((phase, at))
    assert {phase for phase, _ in killed} == set(plan), (killed, events)
    for _ in range(2):  # asynchronous kills at a random moment after set-up
        proc = _start(tmp_path, setup, "none", 0)
        assert proc.stdout.readline().strip() == "READY"
        time.sleep(rng.uniform(0.0, 0.6))
        proc.kill()
        proc.communicate(timeout=60)
    proc = _start(tmp_path, setup, "none", 0)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "DONE" in out, err[-3000:]
    import trax_attr
    resumed = trax_attr.store.Store(tmp_path, {}).load_scores("test")
    np.testing.assert_allclose(resumed, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())
    leftovers = [p.name for p in tmp_path.rglob(".*") if p.suffix in (".tmp", ".partial")]
    assert not leftovers, leftovers


_WRITER = """
import sys, numpy as np
from trax_attr.store import Store
store = Store(sys.argv[1], {"n": 4096})
parity, n, k = int(sys.argv[2]), 4096, 8
rows = np.arange(parity, n, 2)
for start in range(0, len(rows), 64):
    chunk = rows[start:start + 64]
    with store.model_lock(0, shared=True, doing="featurize"):
        arrays = store.model_arrays(0, n, k)
        values = {"grads": np.repeat(chunk[:, None], k, 1).astype(np.float32),
                  "out_to_loss": chunk.astype(np.float32)}
        store.write_rows(arrays, chunk, values, np.ones(len(chunk), np.uint8))
"""


def test_two_processes_writing_interleaved_rows_lose_nothing(tmp_path):
    """Even rows from one process, odd rows from another, at once: every row of every
    4 KiB page (the done flags of 4096 rows share one page) is kept."""
    from trax_attr.store import Store

    Store(tmp_path, {"n": 4096}).create_model(0, "f")
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), str(p)],
                              env=_env(), stderr=subprocess.PIPE, text=True) for p in (0, 1)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
    arrays = Store(tmp_path, {"n": 4096}).model_arrays(0, 4096, 8, mode="r")
    rows = np.arange(4096)
    assert (arrays["done"] == 1).all()
    np.testing.assert_array_equal(arrays["out_to_loss"], rows.astype(np.float32))
    np.testing.assert_array_equal(arrays["grads"], np.repeat(rows[:, None], 8, 1))
