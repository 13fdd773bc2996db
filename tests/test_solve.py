"""The sharded finalize on this process's devices (one here; 8 in test_sharding.py): block
Gauss-Jordan against LAPACK, the path chosen by memory, row ranges of the score stream."""

import numpy as np
import pytest

from trax_attr import parallel, streams
from trax_attr.engine import linalg
from trax_attr.parallel import solve


def _gram(seed, n, k):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, k)) * np.linspace(0.3, 2, k)).astype(np.float32)
    return x, x.astype(np.float64).T @ x


@pytest.mark.parametrize("k, block", [(37, 8), (64, 64), (50, 256)])
def test_gauss_jordan_inverse_against_lapack(k, block):
    """Block sizes that divide k, equal it, or exceed it (padding with identity rows)."""
    x, gram = _gram(0, 3 * k, k)
    mesh = solve.solve_mesh(parallel.default_mesh())
    lay = solve.layout(k, mesh.size, block)
    acc = streams.stream_gram_sharded(lambda a, b: x[a:b], range(len(x)), -(-len(x) // 40),
                                       40, mesh, lay)
    np.testing.assert_allclose(solve.fetch(acc, lay, mesh), gram, rtol=1e-5,
                               atol=1e-5 * np.abs(gram).max())
    a, value = solve.inverse(acc, len(x), "auto", mesh, lay)
    expected = linalg.inverse_gram(gram, linalg.resolve_lambda("auto", gram, len(x)))
    assert value == pytest.approx(linalg.resolve_lambda("auto", gram, len(x)), rel=1e-6)
    assert np.abs(solve.fetch(a, lay, mesh) - expected).max() <= 1e-5 * np.abs(expected).max()


def test_sweep_rows_is_one_gauss_jordan_step():
    """One step on all rows, checked against the definition with numpy."""
    import jax.numpy as jnp

    rng = np.random.default_rng(1)
    m = rng.normal(size=(12, 12))
    m = m @ m.T + 12 * np.eye(12)
    start, b = 4, 4
    j = slice(start, start + b)
    p = np.linalg.inv(m[j, j])
    expected = m - m[:, j] @ p @ m[j, :]
    expected[:, j] = -m[:, j] @ p
    got = np.asarray(linalg.sweep_rows(jnp.asarray(m, jnp.float32),
                                       jnp.asarray(m[j, :], jnp.float32),
                                       jnp.asarray(p, jnp.float32), start, 4))
    rest = np.r_[0:start, start + b:12]   # rows in J are the caller's to overwrite
    np.testing.assert_allclose(got[rest], expected[rest], rtol=1e-5, atol=1e-5)


def test_choose_solve_by_host_memory():
    assert linalg.choose_solve("auto", 2048, np.float32) == "host"
    assert linalg.choose_solve("auto", 16384, np.float32) == "sharded"
    assert linalg.host_solve_bytes(14654) <= linalg.HOST_SOLVE_LIMIT < \
        linalg.host_solve_bytes(14655)
    assert linalg.choose_solve("auto", 16384, np.float64) == "host"  # float64 needs x64
    assert linalg.choose_solve("sharded", 64, np.float32) == "sharded"
    with pytest.raises(ValueError, match="jax_enable_x64"):
        linalg.choose_solve("sharded", 64, np.float64)
    with pytest.raises(ValueError, match="solve must be one of"):
        linalg.choose_solve("gpu", 64, np.float32)


def test_stream_scores_of_a_row_range_are_those_rows_of_all():
    rng = np.random.default_rng(2)
    n, m, k = 301, 9, 8
    feats = rng.normal(size=(2, n, k)).astype(np.float32)
    weights = rng.uniform(0.1, 1, n).astype(np.float32)
    folded = rng.normal(size=(2, k, m)).astype(np.float32)
    mesh = parallel.default_mesh()
    args = (lambda a, b: feats[:, a:b], lambda a, b: weights[a:b], folded, n, 64, mesh)
    dense = streams.stream_scores(*args)
    part = streams.stream_scores(*args, rows=range(100, 250))
    np.testing.assert_allclose(part, dense[100:250], rtol=1e-6, atol=1e-7)
    top = streams.stream_scores(*args, top_k=4, rows=range(100, 250))
    np.testing.assert_array_equal(top.proponents, 100 + np.argsort(-dense[100:250], 0)[:4].T)
    empty = streams.stream_scores(*args, top_k=4, rows=range(5, 5))
    assert empty.proponents.shape == (m, 0)
    # one process: the merge over processes is the identity
    assert streams.merge_process_topk(top, 4) is top


def test_stream_fold_by_row_blocks_equals_the_whole_fold():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(70, 70)).astype(np.float32)
    targets = rng.normal(size=(5, 70)).astype(np.float32)
    whole = np.asarray(parallel.fold(a[None], targets[None]))[0]
    blocks = streams.stream_fold(lambda s, e: a[s:e], targets, range(70), 16)
    np.testing.assert_allclose(blocks, whole, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(streams.stream_fold(lambda s, e: a[s:e], targets,
                                                    range(20, 45), 16), whole[20:45],
                               rtol=1e-5, atol=1e-5)


def test_gathers_with_one_process():
    x = np.arange(6.0).reshape(3, 2)
    np.testing.assert_array_equal(parallel.process_allgather(x), x[None])
    np.testing.assert_array_equal(parallel.process_concat(x), x)
    np.testing.assert_array_equal(parallel.process_sum(x), x)


def test_pivot_inverse_against_float64_inverse_and_cholesky():
    """The scalar Gauss-Jordan sweeps: D⁻¹ against numpy's float64 inverse, the pivots'
    square roots against diag of numpy's Cholesky factor; an indefinite D gives a NaN."""
    import jax.numpy as jnp

    rng = np.random.default_rng(4)
    x = rng.normal(size=(40, 16)) * np.linspace(0.5, 3, 16)
    d = x.T @ x
    inv, diag = linalg.pivot_inverse(jnp.asarray(d, jnp.float32))
    expected = np.linalg.inv(d)
    assert np.abs(np.asarray(inv) - expected).max() <= 1e-5 * np.abs(expected).max()
    np.testing.assert_allclose(np.asarray(diag), np.diagonal(np.linalg.cholesky(d)),
                               rtol=1e-5)
    indefinite = d - 1.01 * np.linalg.eigvalsh(d)[-1] * np.eye(16)
    assert np.isnan(np.asarray(linalg.pivot_inverse(jnp.asarray(indefinite,
                                                                jnp.float32))[1])).any()
