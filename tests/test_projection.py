"""One suite every projector passes, plus the properties of the hashed matrix."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import trax_attr
from trax_attr import projection

RANDOM = [
    pytest.param(trax_attr.rademacher(256, dtype=jnp.float32), id="rademacher"),
    pytest.param(trax_attr.normal(256, dtype=jnp.float32), id="normal"),
    pytest.param(trax_attr.rademacher(256, dtype=jnp.float32, generator="threefry"),
                 id="rademacher-threefry"),
    pytest.param(trax_attr.normal(256, dtype=jnp.float32, generator="threefry"),
                 id="normal-threefry"),
    pytest.param(trax_attr.rademacher(256, dtype=jnp.float32, generator="rbg"),
                 id="rademacher-rbg"),
]
ALL = RANDOM + [pytest.param(trax_attr.identity(), id="identity")]


def leaves(key, sizes, batch=6):
    keys = jax.random.split(key, len(sizes))
    return tuple(jax.random.normal(k, (batch, s)) for k, s in zip(keys, sizes))


def test_projection_key_is_fold_in_of_the_seed_key():
    """The key made on the host (threefry in Python, no compile) is jax.random's own
    fold_in(key(seed), model_id), eagerly and inside jit, for edge and random values."""
    rng = np.random.default_rng(0)
    pairs = [(0, 0), (0, 1), (1, 0), (2**32 - 1, 2**32 - 1)] + [
        tuple(int(v) for v in rng.integers(0, 2**32, 2)) for _ in range(16)]
    for seed, model_id in pairs:
        expected = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), model_id))
        key = trax_attr.projection_key(seed, model_id)
        assert key.dtype == jax.random.key(0).dtype
        np.testing.assert_array_equal(jax.random.key_data(key), expected)
    traced = jax.jit(trax_attr.projection_key)(np.uint32(7), np.uint32(3))
    np.testing.assert_array_equal(jax.random.key_data(traced),
                                  jax.random.key_data(trax_attr.projection_key(7, 3)))


@pytest.mark.parametrize("proj", ALL)
def test_project_equals_dense_matrix(proj):
    """φ = Pᵀ g / √d with P from materialize, for leaves split anyhow."""
    key = trax_attr.projection_key(3, 1)
    grads = leaves(jax.random.key(0), (5, 700, 33))
    d = 738
    dense = jnp.concatenate(grads, axis=1) @ trax_attr.materialize(proj, key, d) / np.sqrt(d)
    np.testing.assert_allclose(trax_attr.project(proj, key, grads), dense, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("proj", RANDOM)
def test_matrix_independent_of_blocks_cache_and_batch(proj):
    key = trax_attr.projection_key(0, 0)
    sizes = (1000, 17)
    grads = leaves(jax.random.key(1), sizes, batch=8)
    reference = trax_attr.project(proj, key, grads)
    for block_rows in (1, 7, 64, 4096):
        blocked = dataclasses.replace(proj, block_rows=block_rows)
        np.testing.assert_allclose(trax_attr.project(blocked, key, grads), reference,
                                   rtol=1e-5, atol=1e-5)
    cache = trax_attr.projection_cache(dataclasses.replace(proj, max_cache_bytes=1 << 24), key, sizes)
    assert cache is not None and [c.shape for c in cache] == [(1000, 256), (17, 256)]
    np.testing.assert_allclose(trax_attr.project(proj, key, grads, cache), reference,
                               rtol=1e-5, atol=1e-5)
    # batch size: the features of one example do not depend on its neighbours
    single = trax_attr.project(proj, key, tuple(g[3:4] for g in grads))
    np.testing.assert_allclose(single[0], reference[3], rtol=1e-5, atol=1e-5)


def test_automatic_blocks_grow_with_the_batch_within_bounds():
    proj = trax_attr.rademacher(512)
    assert [proj.rows_per_block(10**6, b) for b in (1, 64, 256, 1024, 4096)] == \
        [1024, 1024, 4096, 16384, 32768]   # 16 rows per example, 1024 to 2**24 / k rows
    assert trax_attr.rademacher(512, block_rows=7).rows_per_block(10**6, 1024) == 7
    # a batch large enough for one block per leaf gives the same features as small blocks
    key = trax_attr.projection_key(0, 0)
    grads = leaves(jax.random.key(2), (3000, 40), batch=256)
    np.testing.assert_allclose(trax_attr.project(proj, key, grads),
                               trax_attr.project(dataclasses.replace(proj, block_rows=100), key, grads),
                               rtol=1e-5, atol=1e-5)


def test_cache_respects_budget():
    size = projection.storage_dtype(jnp.bfloat16).itemsize   # 2, or 4 on CPUs without bf16
    proj = trax_attr.rademacher(128, max_cache_bytes=1000 * 128 * size - 1)
    assert trax_attr.projection_cache(proj, trax_attr.projection_key(0, 0), (1000,)) is None
    cache = trax_attr.projection_cache(
        dataclasses.replace(proj, max_cache_bytes=1000 * 128 * size),
        trax_attr.projection_key(0, 0), (1000,))
    assert cache is not None and cache[0].dtype == projection.storage_dtype(jnp.bfloat16)


def test_kept_matrix_is_stored_in_float32_only_on_cpus_without_bf16():
    assert projection.storage_dtype(jnp.float32, "cpu") == jnp.float32
    assert projection.storage_dtype(jnp.bfloat16, "gpu") == jnp.bfloat16
    assert projection.storage_dtype(jnp.bfloat16, "cpu") in (jnp.bfloat16, jnp.float32)


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_kept_and_regenerated_bfloat16_matrix_give_the_same_features(distribution):
    """The kept P (float32 storage where the CPU has no bf16 dot) holds the bfloat16
    entries themselves: features agree with the regenerated path to float32 summation."""
    proj = getattr(trax_attr, distribution)(128, max_cache_bytes=0)
    key = trax_attr.projection_key(1, 2)
    grads = leaves(jax.random.key(3), (700, 5, 300), batch=16)
    regenerated = trax_attr.project(proj, key, grads)
    cache = trax_attr.projection_cache(dataclasses.replace(proj, max_cache_bytes=1 << 24),
                                       key, (700, 5, 300))
    kept = trax_attr.project(proj, key, grads, cache)
    np.testing.assert_allclose(kept, regenerated, rtol=1e-5, atol=1e-5)
    # and both are the bfloat16 product: round g to bf16, times P's bf16 entries
    p = np.asarray(trax_attr.materialize(proj, key, 1005), np.float32)
    g = np.concatenate([np.asarray(x.astype(jnp.bfloat16), np.float32) for x in grads], 1)
    np.testing.assert_allclose(kept, g @ p / np.sqrt(1005), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("proj", RANDOM)
def test_keys_choose_the_matrix(proj):
    d = 300
    same = trax_attr.materialize(proj, trax_attr.projection_key(5, 2), d)
    again = trax_attr.materialize(proj, trax_attr.projection_key(5, 2), d)
    other_model = trax_attr.materialize(proj, trax_attr.projection_key(5, 3), d)
    other_seed = trax_attr.materialize(proj, trax_attr.projection_key(6, 2), d)
    np.testing.assert_array_equal(same, again)
    for other in (other_model, other_seed):
        # independent matrices agree on about half the signs
        agree = float(jnp.mean(jnp.sign(same) == jnp.sign(other)))
        assert 0.47 < agree < 0.53


def test_entries_have_the_right_distribution():
    d = 4000
    signs = np.asarray(trax_attr.materialize(trax_attr.rademacher(512, dtype=jnp.float32),
                                             trax_attr.projection_key(0, 0), d))
    assert set(np.unique(signs)) == {-1.0, 1.0}
    assert abs(signs.mean()) < 0.005                                 # 2M entries: sd 7e-4
    corr = np.corrcoef(signs[:, :64].T)                              # columns independent
    assert np.abs(corr[np.triu_indices(64, 1)]).max() < 0.08         # sd 1/√4000 = 0.016
    rows = np.corrcoef(signs[:64])                                   # rows independent
    assert np.abs(rows[np.triu_indices(64, 1)]).max() < 0.2          # sd 1/√512 = 0.044
    gauss = np.asarray(trax_attr.materialize(trax_attr.normal(512, dtype=jnp.float32),
                                             trax_attr.projection_key(0, 0), d)).ravel()
    assert abs(gauss.mean()) < 0.005 and abs(gauss.std() - 1) < 0.005
    fourth = np.mean(gauss ** 4)                                     # Gaussian kurtosis: 3
    assert abs(fourth - 3) < 0.05


@pytest.mark.parametrize("proj", RANDOM)
def test_johnson_lindenstrauss(proj):
    """Norms and inner products are preserved: ‖Pᵀg‖²/k ≈ ‖g‖² within a few 1/√k."""
    k, d = 1024, 5000
    proj = dataclasses.replace(proj, proj_dim=k)
    g = jax.random.normal(jax.random.key(7), (20, d))
    phi = trax_attr.project(proj, trax_attr.projection_key(0, 0), (g,)) * np.sqrt(d / k)
    # E‖φ‖² = ‖g‖², relative sd √(2/k) = 0.044 for each of 20 vectors: allow 5 sd
    ratio = np.sum(np.asarray(phi) ** 2, 1) / np.sum(np.asarray(g) ** 2, 1)
    assert np.abs(ratio - 1).max() < 5 * np.sqrt(2 / k)
    gram_true = np.asarray(g @ g.T) / d
    gram_proj = np.asarray(phi @ phi.T) / d
    assert np.abs(gram_proj - gram_true).max() < 5 * np.sqrt(2 / k)


def test_bfloat16_projection_is_close_to_float32():
    key = trax_attr.projection_key(0, 0)
    grads = leaves(jax.random.key(2), (3000,))
    exact = trax_attr.project(trax_attr.rademacher(512, dtype=jnp.float32), key, grads)
    fast = trax_attr.project(trax_attr.rademacher(512), key, grads)
    assert fast.dtype == jnp.float32
    rel = float(jnp.linalg.norm(fast - exact) / jnp.linalg.norm(exact))
    assert 0 < rel < 1e-2          # bf16 rounds the gradient (8 bits of mantissa)


def test_no_recompilation_on_second_batch():
    proj = trax_attr.rademacher(64)
    key = trax_attr.projection_key(0, 0)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(grads):
        return trax_attr.project(proj, key, grads)

    for seed in range(3):
        run(leaves(jax.random.key(seed), (100, 10)))


@pytest.mark.parametrize("bad, message", [
    (dict(proj_dim=0), "proj_dim must be a positive integer"),
    (dict(proj_dim=2.5), "proj_dim must be a positive integer"),
    (dict(proj_dim=8, dtype=jnp.int32), "not a projection compute dtype"),
    (dict(proj_dim=8, max_cache_bytes=-1), "max_cache_bytes"),
])
def test_bad_arguments_say_the_fix(bad, message):
    with pytest.raises(ValueError, match=message):
        trax_attr.rademacher(**bad)


def test_unknown_projector_lists_valid_names():
    with pytest.raises(ValueError, match="identity.*normal.*rademacher"):
        projection.get_projector("gaussian", 8)


@pytest.mark.parametrize("generator", ["threefry", "rbg"])
def test_jax_random_generator_is_the_same_matrix_for_any_block_or_column_split(generator):
    """P from jax.random tiles: any block of rows (starting inside a tile or not) and any
    column range is a slice of the one matrix; it differs from the hash generator's."""
    proj = trax_attr.rademacher(64, dtype=jnp.float32, generator=generator)
    key = trax_attr.projection_key(2, 5)
    full = np.asarray(trax_attr.materialize(proj, key, 1000))
    for start, rows in ((0, 1000), (3, 300), (255, 2), (256, 256), (700, 300)):
        block = np.asarray(proj.matrix_block(key, start, rows))
        np.testing.assert_array_equal(block, full[start:start + rows])
    cols = np.asarray(jax.jit(lambda c: proj.matrix_block(key, 100, 50, c, 16))(jnp.int32(32)))
    np.testing.assert_array_equal(cols, full[100:150, 32:48])
    hashed = np.asarray(trax_attr.materialize(dataclasses.replace(proj, generator="hash"),
                                              key, 1000))
    assert 0.45 < float(np.mean(np.sign(hashed) == np.sign(full))) < 0.55


def test_unknown_generator_lists_the_valid_ones():
    with pytest.raises(ValueError, match="hash.*threefry.*rbg"):
        trax_attr.rademacher(8, generator="philox")
