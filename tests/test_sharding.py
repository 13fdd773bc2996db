"""Scale-out: 1 vs 8 devices, 2 processes vs 1, streamed top-k, multi-process store files."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from trax_attr import parallel, streams
from trax_attr.store import Store, read_rows, write_rows

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"),
                                         env.get("PYTHONPATH", "")])
    return env


def _close(actual, expected, rtol):
    """rtol relative to the scores' scale: entries near 0 differ by float32 rounding of the
    (equal up to ulps) features, which a pure elementwise rtol cannot absorb."""
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def _closed_form(grads, q, targets, lambda_reg):
    """float64 τ = mean_m(Φ_m (Φ_mᵀΦ_m + λI)⁻¹ φ_mᵀ) · mean_m(Q_m) from the stored rows."""
    grads, targets = grads.astype(np.float64), targets.astype(np.float64)
    k = grads.shape[2]
    per_model = [g @ np.linalg.solve(g.T @ g + lambda_reg * np.eye(k), t.T)
                 for g, t in zip(grads, targets)]
    return np.mean(per_model, 0) * q.astype(np.float64).mean(0)[:, None]


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    root = tmp_path_factory.mktemp("eight")
    out = root / "results.npz"
    subprocess.run([sys.executable, str(ROOT / "tests" / "sharding_worker.py"), str(out),
                    str(root)], env=_env(JAX_NUM_CPU_DEVICES="8"), check=True, timeout=300)
    return dict(np.load(out))


@pytest.mark.parametrize("mesh", ["eight", "grid", "proj", "projgen"])
def test_eight_devices_match_one_device(eight_devices, mesh):
    r = eight_devices
    _close(r[f"{mesh}_scores"], r["one_scores"], 1e-5)
    np.testing.assert_array_equal(r[f"{mesh}_proponents"], r["one_proponents"])
    np.testing.assert_array_equal(r[f"{mesh}_opponents"], r["one_opponents"])
    _close(r[f"{mesh}_proponent_scores"], r["one_proponent_scores"], 1e-5)
    _close(r[f"{mesh}_opponent_scores"], r["one_opponent_scores"], 1e-5)


@pytest.mark.parametrize("mesh", ["one", "eight", "grid", "proj", "projgen", "sharded"])
def test_functional_core_equals_traker_on_every_mesh(eight_devices, mesh):
    """An ensemble of 2 on 1 and 8 devices: trak_scores on the stored rows (same mesh,
    same chunks) gives the TRAKer's scores to 1e-6 of their scale. On one CPU device the
    store path multiplies in numpy (streams.on_host) while trak_scores, being jittable,
    runs XLA's kernels: another float32 summation order of XᵀX, amplified by its
    conditioning (3e-6 here; both are 2-3e-6 from the float64 closed form), so 1e-5 as
    between meshes."""
    r = eight_devices
    scores, functional = r[f"{mesh}_scores"], r[f"{mesh}_functional"]
    tolerance = 1e-5 if mesh == "one" else 1e-6
    assert np.abs(functional - scores).max() <= tolerance * np.abs(scores).max()


def test_sharded_solve_scores_match_the_host_solve(eight_devices):
    """XᵀX and its inverse split by rows over 8 devices (float32 Gauss-Jordan) against the
    float64 host inverse on one device: scores to 1e-4 of their scale, same top-k rows."""
    r = eight_devices
    _close(r["sharded_scores"], r["one_scores"], 1e-4)
    np.testing.assert_array_equal(r["sharded_proponents"], r["one_proponents"])
    np.testing.assert_array_equal(r["sharded_opponents"], r["one_opponents"])
    expected = _closed_form(r["sharded_grads"], r["sharded_q"], r["sharded_targets"], 0.05)
    _close(r["sharded_scores"], expected, 1e-4)


def test_sharded_xtx_equals_single_device_xtx(eight_devices):
    r = eight_devices
    assert tuple(r["solve_layout"]) == (100, 104, 13)  # padded with identity rows
    scale = np.abs(r["solve_gram64"]).max()
    # float32 sums in another order than one device's: a few ulps of the largest entry
    assert np.abs(r["solve_gram_sharded"] - r["solve_gram_one"]).max() <= 1e-6 * scale
    assert np.abs(r["solve_gram_sharded"] - r["solve_gram64"]).max() <= 1e-6 * scale


@pytest.mark.parametrize("name", ["auto", "small"])
def test_sharded_inverse_equals_the_float64_host_inverse(eight_devices, name):
    """float32 on the mesh: max |A − A64| ≤ 1e-5 · max |A64| here (λ auto: cond ≈ 10;
    λ = 1e-3 · mean diagonal: cond ≈ 1e3; measured 4e-7 and 3e-6), λ equal to 1e-6."""
    r = eight_devices
    a, a64 = r[f"solve_inverse_{name}"], r[f"solve_inverse64_{name}"]
    assert np.abs(a - a64).max() <= 1e-5 * np.abs(a64).max()
    np.testing.assert_allclose(r[f"solve_lambda_{name}"], r[f"solve_lambda64_{name}"], rtol=1e-6)
    rescaled, rescaled64 = r["solve_rescaled"], r["solve_rescaled64"]
    assert np.abs(rescaled - rescaled64).max() <= 1e-5 * np.abs(rescaled64).max()


def test_sharded_solve_refuses_a_singular_matrix_and_warns_when_ill_conditioned(eight_devices):
    r = eight_devices
    message = str(r["solve_singular"])
    assert "singular" in message and "lambda_reg > 0" in message, message
    assert "ill-conditioned" in str(r["solve_ill_warned"][0])


def test_sharded_finalize_at_another_lambda_solves_the_stored_xtx(eight_devices):
    from trax_attr.engine import inverse_gram

    r = eight_devices
    a64 = inverse_gram(r["sharded_xtx"].astype(np.float64), 0.1)
    assert np.abs(r["sharded_relambda"] - a64).max() <= 1e-5 * np.abs(a64).max()


def test_sharded_scores_match_float64_closed_form(eight_devices):
    r = eight_devices
    expected = _closed_form(r["eight_grads"], r["eight_q"], r["eight_targets"], 0.05)
    _close(r["eight_scores"], expected, 1e-4)


def test_top_k_matches_sorting_the_dense_scores(eight_devices):
    r = eight_devices
    scores = r["eight_scores"].astype(np.float64)
    order = np.argsort(-scores, axis=0, kind="stable")[:7].T          # (m, 7)
    np.testing.assert_array_equal(r["eight_proponents"], order)
    np.testing.assert_allclose(r["eight_proponent_scores"],
                               np.take_along_axis(scores.T, order, 1), rtol=1e-6)
    low = np.argsort(scores, axis=0, kind="stable")[:7].T
    np.testing.assert_array_equal(r["eight_opponents"], low)


@pytest.fixture(scope="module")
def process_runs(tmp_path_factory):
    """examples/multihost.py as 2 processes and as 1 (host solve), and as 2 processes of 2
    devices each with XᵀX and its inverse sharded over all 4 (sharded solve). In every
    run each process scores its own training rows."""
    root = tmp_path_factory.mktemp("processes")
    results = {}
    for name, count, devices, solve in [("two", 2, 1, "host"), ("one", 1, 1, "host"),
                                        ("two_sharded", 2, 2, "sharded")]:
        out = root / f"{name}.npz"
        subprocess.run([sys.executable, "-m", "trax_attr.parallel.launch", "--num-processes",
                        str(count), "--devices-per-process", str(devices), "--timeout", "240",
                        str(ROOT / "examples" / "multihost.py"), "--save-dir",
                        str(root / name), "--out", str(out), "--solve", solve],
                       env=_env(), check=True, timeout=300, cwd=ROOT)
        results[name] = dict(np.load(out))
    return results


@pytest.mark.parametrize("name, rtol", [("two", 1e-5), ("two_sharded", 1e-4)])
def test_two_processes_match_one_process(process_runs, name, rtol):
    """Scores of row ranges gathered over processes, top-k merged over processes: those of
    one process (host solve: 1e-5; sharded float32 solve over 4 devices: 1e-4)."""
    two, one = process_runs[name], process_runs["one"]
    _close(two["scores"], one["scores"], rtol)
    np.testing.assert_array_equal(two["proponents"], one["proponents"])
    np.testing.assert_array_equal(two["opponents"], one["opponents"])
    _close(two["proponent_scores"], one["proponent_scores"], rtol)
    _close(two["opponent_scores"], one["opponent_scores"], rtol)


@pytest.mark.parametrize("name", ["two", "two_sharded"])
def test_top_k_merged_over_processes_is_sorting_the_dense_scores(process_runs, name):
    r = process_runs[name]
    scores = r["scores"].astype(np.float64)
    k = r["proponents"].shape[1]
    np.testing.assert_array_equal(r["proponents"], np.argsort(-scores, axis=0, kind="stable")[:k].T)
    np.testing.assert_array_equal(r["opponents"], np.argsort(scores, axis=0, kind="stable")[:k].T)
    # the top-k and the dense path sum the same products in other orders (float32)
    np.testing.assert_allclose(r["opponent_scores"], np.sort(scores, axis=0)[:k].T, rtol=1e-5)
    np.testing.assert_allclose(r["proponent_scores"], -np.sort(-scores, axis=0)[:k].T, rtol=1e-5)


def test_stream_scores_top_k_against_numpy():
    """Streaming top-k with chunks that split rows and targets unevenly, on this process's mesh."""
    rng = np.random.default_rng(1)
    n, m, k = 517, 23, 16
    feats = rng.normal(size=(2, n, k)).astype(np.float32)
    weights = rng.uniform(0.1, 1, n).astype(np.float32)
    targets = rng.normal(size=(2, m, k)).astype(np.float32)
    mesh = parallel.default_mesh()
    read_f = lambda a, b: feats[:, a:b]  # noqa: E731
    read_w = lambda a, b: weights[a:b]  # noqa: E731
    folded = targets.transpose(0, 2, 1)  # A = I: the targets folded with the identity
    dense = streams.stream_scores(read_f, read_w, folded, n, 100, mesh)
    expected = np.einsum("ank,amk->nm", feats.astype(np.float64), targets) * weights[:, None]
    _close(dense, expected, 1e-5)
    top = streams.stream_scores(read_f, read_w, folded, n, 100, mesh, top_k=5, target_chunk=7)
    np.testing.assert_array_equal(top.proponents, np.argsort(-expected, 0)[:5].T)
    np.testing.assert_array_equal(top.opponents, np.argsort(expected, 0)[:5].T)
    _close(top.opponent_scores, np.sort(expected, 0)[:5].T, 1e-5)
    assert top.proponents.shape == (m, 5) and top.proponent_scores.dtype == np.float32


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stream_gram_against_numpy(dtype):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(301, 12)).astype(np.float32)
    gram = streams.stream_gram(lambda a, b: x[a:b], range(7, 301), 12, 50,
                                parallel.default_mesh(), dtype)
    assert gram.dtype == dtype
    ref = x[7:].astype(np.float64).T @ x[7:].astype(np.float64)
    np.testing.assert_allclose(gram, ref, rtol=1e-5, atol=1e-4)


def test_rows_io_and_no_clobber(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, np.zeros((10, 3), np.float32))
    write_rows(path, 4, np.ones((2, 3), np.float32))
    write_rows(path, 0, np.full((1, 3), 2, np.float32))
    expected = np.zeros((10, 3), np.float32)
    expected[4:6], expected[0] = 1, 2
    np.testing.assert_array_equal(np.load(path), expected)
    np.testing.assert_array_equal(read_rows(path, 3, 6), expected[3:6])
    with pytest.raises(ValueError, match="do not fit"):
        write_rows(path, 9, np.ones((2, 3), np.float32))
    # Another process opening the same array must not replace it by a fresh zero file
    # (creation is serialized under the store's "create" lock). Own Store, own descriptors.
    first, second = Store(tmp_path / "s", {}), Store(tmp_path / "s", {})
    shared = tmp_path / "s" / "models" / "0" / "grads.npy"
    first.open_array(shared, (10, 3), np.float32)
    write_rows(shared, 0, expected)
    second.open_array(shared, (10, 3), np.float32)
    np.testing.assert_array_equal(read_rows(shared, 0, 10), expected)


def test_process_rows_tile_the_range():
    parts = [parallel.process_rows(10, i, 3, block=1) for i in range(3)]
    assert [list(p) for p in parts] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    # by default slices start at multiples of 256 rows (one object-store chunk, one host)
    parts = [parallel.process_rows(1200, i, 2) for i in range(2)]
    assert parts == [range(0, 512), range(512, 1200)]
    parts = [parallel.process_rows(100, i, 2) for i in range(2)]
    assert parts == [range(0, 0), range(0, 100)]
    assert parallel.process_rows(10) == range(10)  # one process here


def test_pad_batch_repeats_a_real_row():
    x, y = np.arange(10.0).reshape(5, 2), np.arange(5)
    px, py = parallel.pad_batch((x, y), 4)
    assert px.shape == (8, 2) and (px[5:] == x[0]).all() and (py[:5] == y).all()
    assert parallel.pad_batch((x, y), 5)[0] is x


def test_check_mesh_errors():
    with pytest.raises(TypeError, match="jax.sharding.Mesh"):
        parallel.check_mesh("data")
    assert parallel.check_mesh(None).size == jax.local_device_count()


def test_finalize_scores_rejects_bad_top_k(tmp_path):
    import trax_attr

    traker = trax_attr.TRAKer(model=lambda p, x: x @ p, train_set_size=5, save_dir=tmp_path)
    with pytest.raises(ValueError, match="top_k must be"):
        traker.finalize_scores("t", top_k=6)


def test_sharded_featurize_compiles_once_per_shape():
    import chex

    import trax_attr
    from trax_attr.engine import Checkpoint, Featurizer

    @chex.assert_max_traces(n=2)  # one trace calls it twice: the output's grad, and Q
    def apply(w, x):
        return x @ w

    model = trax_attr.callable_model(apply)
    w = np.ones((3, 2), np.float32)
    f = Featurizer(trax_attr.get_task("classification"), model, trax_attr.select(w),
                   trax_attr.identity())
    mesh = parallel.default_mesh()
    ckpt = Checkpoint((w,), (), None, trax_attr.projection_key(0, 0), None)
    for seed in range(3):
        x = np.random.default_rng(seed).normal(size=(8, 3)).astype(np.float32)
        y = np.arange(8) % 2
        phi, q = parallel.featurize(f, mesh, ckpt, (x, y))
        expected, _ = trax_attr.featurize(lambda w, x: x @ w, w, (x, y), task="classification")
        np.testing.assert_allclose(np.asarray(phi), np.asarray(expected), rtol=1e-6)


def test_project_columns_are_slices_of_the_full_projection():
    import jax.numpy as jnp

    from trax_attr.projection import normal, project, projection_key, rademacher

    rng = np.random.default_rng(3)
    grads = (jnp.asarray(rng.normal(size=(4, 37)), jnp.float32),
             jnp.asarray(rng.normal(size=(4, 20)), jnp.float32))
    for projector in (rademacher(24, dtype=jnp.float32, block_rows=8),
                      normal(24, dtype=jnp.float32, block_rows=8)):
        key = projection_key(0, 3)
        full = np.asarray(jax.jit(project, static_argnums=0)(projector, key, grads))
        columns = jax.jit(lambda k, g, c: project(projector, k, g, col_start=c, num_cols=8))
        part = np.asarray(columns(key, grads, jnp.int32(8)))
        np.testing.assert_allclose(part, full[:, 8:16], rtol=1e-6, atol=1e-6)


def test_two_process_finalize_is_refused_on_every_rank_while_the_checkpoint_is_busy(tmp_path):
    """Rank 0 takes the exclusive finalize lock for the job; when another process holds the
    checkpoint (here: a featurizer's shared lock), both ranks raise StoreBusyError and
    neither is left waiting at a barrier."""
    import time

    save_dir, out, ready = tmp_path / "store", str(tmp_path / "out"), str(tmp_path / "ready")
    job = subprocess.Popen([sys.executable, "-m", "trax_attr.parallel.launch", "--num-processes", "2",
                            "--timeout", "240", str(ROOT / "tests" / "finalize_busy_worker.py"),
                            str(save_dir), out, ready], env=_env(), cwd=ROOT)
    try:
        deadline = time.monotonic() + 240
        while not os.path.exists(ready):
            assert job.poll() is None and time.monotonic() < deadline, "workers did not start"
            time.sleep(0.05)
        with Store(save_dir, {}).model_lock(0, shared=True, doing="featurize"):
            open(ready + ".locked", "w").close()
            assert job.wait(timeout=240) == 0
    finally:
        if job.poll() is None:
            job.kill()
    for rank in (0, 1):
        text = Path(f"{out}.{rank}").read_text()
        assert text.startswith("busy:") and "model_id=0" in text, (rank, text)
