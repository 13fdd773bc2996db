"""The object-store backend (save_dir a URL): memory://, file:// and s3:// on an
S3-compatible server on 127.0.0.1 (moto's server mode), against the local store."""

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("tensorstore")

import _s3server  # noqa: E402
import _objstore_job as two_processes  # noqa: E402
import _trak_job as job  # noqa: E402

import trax_attr  # noqa: E402
from trax_attr.store import StoreBusyError, StoreCorruptedError  # noqa: E402
from trax_attr.store.objects import Objects  # noqa: E402
from trax_attr.store.objrows import ObjectRowArrays, ObjectRows, write_object_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
JOB = str(ROOT / "tests" / "_trak_job.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The digits data of tests/_trak_job.py and that job's scores in a local store."""
    folder = tmp_path_factory.mktemp("objstore")
    data = folder / "digits.npz"
    job.write_data(data)
    return data, job.run(folder / "local", data), folder


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on 127.0.0.1, its endpoint and credentials in the environment."""
    server, env = _s3server.start(tmp_path_factory)
    patch = pytest.MonkeyPatch()
    for key, value in env.items():
        patch.setenv(key, value)
    yield env
    patch.undo()
    server.stop()


def _env(extra, cache):
    env = dict(os.environ, **extra, JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"),
                                         env.get("PYTHONPATH", "")])
    return env


def test_memory_store_scores_equal_the_local_store_and_resume(setup):
    data, local, _ = setup
    np.testing.assert_array_equal(job.run("memory://scores/run", data), local)
    # opened again by the same job: every step finds its work done, the scores stay
    np.testing.assert_array_equal(job.run("memory://scores/run", data), local)


def test_another_lambda_solves_the_stored_xtx_and_replaces_the_inverse(setup, tmp_path):
    data, _, folder = setup
    shutil.copytree(folder / "local", tmp_path / "local")
    url = "memory://lambda/run"
    job.run(url, data)
    scores = {}
    for name, save_dir in (("local", tmp_path / "local"), ("memory", url)):
        traker = trax_attr.TRAKer(model=job.apply, train_set_size=job.N_TRAIN,
                                  save_dir=save_dir, proj_dim=32, proj_dtype=jnp.float32)
        traker.finalize_features(lambda_reg=0.5)
        assert traker.lambdas()[0]["value"] == 0.5
        scores[name] = traker.finalize_scores(exp_name="test")
    np.testing.assert_array_equal(scores["memory"], scores["local"])
    inverses = {key.split("/")[0] for key in Objects(url).list("models/0/")
                if key.startswith("inverse.")}
    assert len(inverses) == 1  # the inverse for λ = 0.01 is deleted


def test_a_second_job_on_one_url_is_refused_until_it_takes_the_first_ones_id(
        setup, monkeypatch, tmp_path):
    data, local, _ = setup
    url = f"file://{tmp_path}/store"
    monkeypatch.setenv("TRAX_ATTR_JOB_ID", "first-job")
    np.testing.assert_array_equal(job.run(url, data), local)
    monkeypatch.setenv("TRAX_ATTR_JOB_ID", "second-job")
    with pytest.raises(StoreBusyError, match=re.escape(url) + ".*belongs to another job "
                       r"\(job id 'first-job'.*TRAX_ATTR_JOB_ID=first-job"):
        trax_attr.TRAKer(model=job.apply, train_set_size=job.N_TRAIN, save_dir=url,
                         proj_dim=32)
    monkeypatch.setenv("TRAX_ATTR_JOB_ID", "first-job")  # the first job, resumed
    np.testing.assert_array_equal(job.run(url, data), local)


def test_rows_of_another_process_are_refused(tmp_path):
    objects = Objects(f"file://{tmp_path}/rows")
    arrays = ObjectRowArrays()
    arrays.rows = {name: ObjectRows(objects, name, shape, dtype, create=True,
                                    fill_missing=name == "done")
                   for name, shape, dtype in [("grads", (600, 4), np.float32),
                                              ("check", (600,), np.uint64),
                                              ("done", (600,), np.uint8)]}
    arrays["done"] = np.zeros(600, np.uint8)
    arrays.owned, arrays.what = range(256, 600), "rows"
    rows = np.arange(250, 260)
    with pytest.raises(ValueError, match=r"rows \[256, 600\) only .*got rows \[250, 251"):
        write_object_rows(arrays, rows, {"grads": np.ones((10, 4))}, np.ones(10, np.uint8))
    write_object_rows(arrays, rows + 10, {"grads": np.ones((10, 4))}, np.ones(10, np.uint8))
    assert np.asarray(arrays.rows["done"]).sum() == 10 and arrays["done"].sum() == 10


def test_damaged_moved_or_missing_objects_are_named_not_used(setup, s3):
    data, local, _ = setup
    bucket = _s3server.new_bucket(s3)
    url = f"s3://{bucket}/run"
    np.testing.assert_array_equal(job.run(url, data), local)
    client, keys = _s3server.client(s3), _s3server.keys(s3, bucket)
    chunk = {name: next(k for k in keys if re.fullmatch(rf"run/models/{name}/c/0(/0)?", k))
             for name in ("0/grads", "1/grads")}
    inverse = next(k for k in keys if re.fullmatch(r"run/models/0/inverse\.[0-9a-f]+/c/0/0", k))

    def body(key):
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def scores_fail(match):
        with pytest.raises(StoreCorruptedError, match=match):
            job.run(url, data)

    saved = {key: body(key) for key in (*chunk.values(), inverse)}
    # a chunk of checkpoint 1's rows in checkpoint 0's place: a valid chunk, wrong rows
    client.put_object(Bucket=bucket, Key=chunk["0/grads"], Body=saved[chunk["1/grads"]])
    scores_fail(re.escape(f"{url}/models/0/grads") + "'? does not match the checksum")
    client.put_object(Bucket=bucket, Key=chunk["0/grads"], Body=saved[chunk["0/grads"]])
    # a damaged chunk of the inverse fails its crc32c
    client.put_object(Bucket=bucket, Key=inverse, Body=saved[inverse][:-9] + b"\0" * 9)
    scores_fail(re.escape(inverse))
    client.put_object(Bucket=bucket, Key=inverse, Body=saved[inverse])
    # a missing chunk is an error naming it, never zeros
    client.delete_object(Bucket=bucket, Key=chunk["1/grads"])
    scores_fail(re.escape(chunk["1/grads"]) + ".* is missing")


def test_kill9_mid_featurize_then_resume_gives_identical_scores(setup, s3, monkeypatch):
    """SIGKILL in the second batch of featurize, between its values and its done flags
    (event 15: the values and checks are written, the flags not); the resumed job
    finishes with the local store's scores."""
    data, local, folder = setup
    url = f"s3://{_s3server.new_bucket(s3)}/run"
    env = _env({"TRAX_ATTR_JOB_ID": "killed-job"}, folder / "jax_cache")
    proc = subprocess.run([sys.executable, JOB, url, str(data), "featurize", "15"],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    monkeypatch.setenv("TRAX_ATTR_JOB_ID", "killed-job")
    store = trax_attr.store.open_store(url, {})
    done = store.rows_done(0)
    grads = np.asarray(store.model_arrays(0, job.N_TRAIN, 32, mode="r")["grads"])
    # the first batch is done; the second's values are stored but it is not marked done
    assert done[:32].all() and not done[32:].any()
    assert np.abs(grads[32:64]).min(axis=1).all() and not grads[64:].any()
    np.testing.assert_array_equal(job.run(url, data), local)


def test_two_processes_into_one_s3_store_match_the_local_store(setup, s3, tmp_path):
    """tests/_objstore_job.py as 2 processes (trax_attr.parallel.launch), each writing
    its own chunks of one s3:// store, against 1 process with a local store."""
    data, _, folder = setup
    url = f"s3://{_s3server.new_bucket(s3)}/two"
    out = tmp_path / "two.npy"
    subprocess.run([sys.executable, "-m", "trax_attr.parallel.launch", "--num-processes", "2",
                    "--timeout", "240", str(ROOT / "tests" / "_objstore_job.py"), url,
                    str(data), str(out)],
                   env=_env({}, folder / "jax_cache"), check=True, timeout=300, cwd=ROOT)
    one = two_processes.run(tmp_path / "local", data)
    # XᵀX summed over the processes' rows in another order: float32 rounding only
    np.testing.assert_allclose(np.load(out), one, rtol=1e-5, atol=1e-5 * np.abs(one).max())
