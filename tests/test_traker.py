"""The TRAKer workflow over the store: resume, partial batches, settings, experiments."""

import os
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import trax_attr
from linear_model import linear_apply

N, M = 240, 12


@pytest.fixture()
def data(digits):
    x, y = digits
    return (x[:N], y[:N]), (x[1500:1500 + M], y[1500:1500 + M])


def make(tmp_path, **kwargs):
    settings = dict(model=linear_apply, train_set_size=N, save_dir=tmp_path, proj_dim=64,
                    lambda_reg=1e-3, proj_dtype=jnp.float32)
    settings.update(kwargs)
    return trax_attr.TRAKer(**settings)


def featurize_all(traker, params, train, model_id=0, batch=40):
    traker.load_checkpoint(params, model_id=model_id)
    for start in range(0, N, batch):
        traker.featurize(batch=tuple(a[start:start + batch] for a in train))


def scores_of(traker, checkpoints, target, exp="exp"):
    for model_id, params in enumerate(checkpoints):
        traker.start_scoring_checkpoint(exp, params, model_id=model_id, num_targets=M)
        traker.score(batch=target)
    return traker.finalize_scores(exp)


def full_run(tmp_path, checkpoints, data, **kwargs):
    traker = make(tmp_path, **kwargs)
    for model_id, params in enumerate(checkpoints):
        featurize_all(traker, params, data[0], model_id)
    traker.finalize_features()
    return traker, scores_of(traker, checkpoints, data[1])


def test_scores_match_the_functional_core(tmp_path, linear_checkpoints, data):
    _, scores = full_run(tmp_path, linear_checkpoints, data)
    (train, target), stack = data, jnp.stack
    feats = [trax_attr.featurize(linear_apply, p, train, model_id=i,
                                 projector=trax_attr.rademacher(64, dtype=jnp.float32))
             for i, p in enumerate(linear_checkpoints)]
    targets = [trax_attr.featurize(linear_apply, p, target, model_id=i,
                                   projector=trax_attr.rademacher(64, dtype=jnp.float32))[0]
               for i, p in enumerate(linear_checkpoints)]
    expected = trax_attr.trak_scores(stack([f[0] for f in feats]), stack([f[1] for f in feats]),
                                     stack(targets), lambda_reg=1e-3)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_resume_skips_finished_rows(tmp_path, linear_checkpoints, data):
    params = linear_checkpoints[0]
    _, reference = full_run(tmp_path / "ref", [params], data)

    first = make(tmp_path / "run")
    first.load_checkpoint(params, model_id=0)
    first.featurize(batch=tuple(a[:100] for a in data[0]), inds=np.arange(100))
    del first                                          # "crash" after 100 rows

    second = make(tmp_path / "run")
    second.load_checkpoint(params, model_id=0)
    computed = []
    original = second._features
    second._features = lambda *args: computed.append(len(args[-1][0])) or original(*args)
    for start in range(0, N, 40):                      # the same loop again from the start
        second.featurize(batch=tuple(a[start:start + 40] for a in data[0]))
    # rows 0..99 were on disk: two batches skipped, 80..119 computed its 20 new rows (as 32)
    assert computed == [32, 40, 40, 40]
    second.finalize_features()
    # rows 100..119 were computed in a padded batch of 32, not 40: float32 rounding of
    # the features (~1e-7) may differ, so entries near 0 differ relative to the scale only
    np.testing.assert_allclose(scores_of(second, [params], data[1]), reference, rtol=1e-5,
                               atol=1e-5 * np.abs(reference).max())


def test_partly_finished_batch_computes_only_the_rest(tmp_path, linear_checkpoints, data):
    traker = make(tmp_path)
    params = linear_checkpoints[0]
    traker.load_checkpoint(params, model_id=0)
    train = data[0]
    traker.featurize(batch=tuple(a[:30] for a in train), inds=np.arange(30))
    store = traker.store.model_arrays(0, N, 64)
    before = np.array(store["grads"][:30])
    calls = []
    original = traker._features
    traker._features = lambda *args: calls.append(len(args[-1][0])) or original(*args)
    traker.featurize(batch=tuple(a[20:60] for a in train), inds=np.arange(20, 60))
    assert calls == [32]                               # 30 new rows, padded to 32, not 40
    np.testing.assert_array_equal(store["grads"][:30], before)
    expected, _ = trax_attr.featurize(linear_apply, params, tuple(a[30:60] for a in train),
                                      projector=trax_attr.rademacher(64, dtype=jnp.float32))
    np.testing.assert_allclose(store["grads"][30:60], expected, rtol=1e-5, atol=1e-6)


def test_no_recompilation_on_the_second_batch(tmp_path, linear_checkpoints, data):
    traker = make(tmp_path)
    featurize_all(traker, linear_checkpoints[0], data[0])
    # (the compiled featurizer is shared with earlier TRAKers of the same settings, which
    # may have compiled other batch shapes: count what this run adds)
    compiled = trax_attr.parallel.featurize._cache_size()
    featurize_all(traker, linear_checkpoints[1], data[0], model_id=1)
    assert trax_attr.parallel.featurize._cache_size() == compiled


def test_reopening_with_other_settings_is_refused(tmp_path, linear_checkpoints, data):
    traker = make(tmp_path)
    featurize_all(traker, linear_checkpoints[0], data[0])
    with pytest.raises(ValueError, match=r"proj_dim.*stored 64, given 32"):
        make(tmp_path, proj_dim=32)
    with pytest.raises(ValueError, match=r"seed: stored 0, given 1"):
        make(tmp_path, seed=1)
    with pytest.raises(ValueError, match=r"train_set_size: stored 240, given 100"):
        make(tmp_path, train_set_size=100)
    with pytest.raises(ValueError, match=r"grad_wrt: stored None, given 'w'"):
        make(tmp_path, grad_wrt="w")
    wider = {"w": np.zeros((64, 11), np.float32), "b": np.zeros(11, np.float32)}
    with pytest.raises(ValueError, match=r"grad_dim: stored 650, given 715"):
        make(tmp_path).load_checkpoint(wider, model_id=1)


def test_model_id_holds_one_checkpoint(tmp_path, linear_checkpoints, data):
    traker = make(tmp_path)
    featurize_all(traker, linear_checkpoints[0], data[0])
    with pytest.raises(ValueError, match="holds features of a different checkpoint"):
        traker.load_checkpoint(linear_checkpoints[1], model_id=0)


def test_scoring_errors_name_the_fix(tmp_path, linear_checkpoints, data):
    traker = make(tmp_path)
    params = linear_checkpoints[0]
    with pytest.raises(ValueError, match="never featurized"):
        traker.start_scoring_checkpoint("e", params, model_id=3, num_targets=M)
    featurize_all(traker, params, data[0])
    with pytest.raises(ValueError, match="not finalized"):
        traker.start_scoring_checkpoint("e", params, model_id=0, num_targets=M)
    traker.finalize_features()
    with pytest.raises(ValueError, match="already finalized"):
        traker.featurize(batch=tuple(a[:10] for a in data[0]), inds=np.arange(10))
    with pytest.raises(ValueError, match="differs from the one featurized"):
        traker.start_scoring_checkpoint("e", linear_checkpoints[1], model_id=0, num_targets=M)
    with pytest.raises(ValueError, match="does not exist"):
        traker.finalize_scores("nope")
    traker.start_scoring_checkpoint("e", params, model_id=0, num_targets=M)
    traker.score(batch=tuple(a[:5] for a in data[1]))
    with pytest.raises(ValueError, match="missing 7 of 12 targets"):
        traker.finalize_scores("e")


def test_several_experiments_per_store(tmp_path, linear_checkpoints, data):
    traker, scores = full_run(tmp_path, linear_checkpoints[:1], data)
    (x, y), _ = data
    traker.start_scoring_checkpoint("train_as_targets", linear_checkpoints[0], model_id=0,
                                    num_targets=M)
    traker.score(batch=(x[:M], y[:M]))
    self_scores = traker.finalize_scores("train_as_targets")
    assert self_scores.shape == (N, M)
    # each training example is among its own strongest proponents
    ranks = [(self_scores[:, j] > self_scores[j, j]).sum() for j in range(M)]
    assert np.median(ranks) < 3
    np.testing.assert_array_equal(traker.store.load_scores("exp"), scores)


def test_traker_inverse_rescale_and_float64_xtx(tmp_path, linear_checkpoints, data):
    params = linear_checkpoints[:1]
    _, plain = full_run(tmp_path / "a", params, data)
    _, wide = full_run(tmp_path / "b", params, data, xtx_dtype=np.float64)
    _, rescaled = full_run(tmp_path / "c", params, data, traker_inverse_rescale=True)
    np.testing.assert_allclose(wide, plain, rtol=1e-3, atol=1e-5 * np.abs(plain).max())
    # rescaling A by a constant scales every score by it
    factor = np.median(rescaled / plain)
    assert not np.isclose(factor, 1.0)
    np.testing.assert_allclose(rescaled, factor * plain, rtol=1e-4,
                               atol=1e-5 * np.abs(rescaled).max())


def test_ill_conditioned_gram_warns_naming_lambda_reg(tmp_path, linear_checkpoints, data):
    traker = make(tmp_path, projector="identity", lambda_reg=0.0)   # d = 650 > n = 240
    featurize_all(traker, linear_checkpoints[0], data[0])
    with pytest.warns(trax_attr.IllConditionedWarning, match="lambda_reg"):
        traker.finalize_features()


def test_inverse_gram_matches_numpy_inverse():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8))
    gram = x.T @ x
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = trax_attr.inverse_gram(gram, 0.5)
    np.testing.assert_allclose(a, np.linalg.inv(gram + 0.5 * np.eye(8)), rtol=1e-10)
    rescaled = trax_attr.inverse_gram(gram, 0.5, traker_inverse_rescale=True)
    np.testing.assert_allclose(np.abs(rescaled).mean(), 1.0)


def test_inverse_gram_caps_the_host_blas_threads_while_it_runs(monkeypatch):
    threadpoolctl = pytest.importorskip("threadpoolctl", reason="the cap needs threadpoolctl")
    import scipy.linalg

    from trax_attr.engine import linalg

    seen = []
    potrf = scipy.linalg.lapack.dpotrf

    def spy(*args, **kwargs):
        seen.append([i["num_threads"] for i in threadpoolctl.threadpool_info()
                     if i["user_api"] == "blas"])
        return potrf(*args, **kwargs)

    monkeypatch.setattr(linalg, "blas_threads", lambda: 1)
    monkeypatch.setattr(scipy.linalg.lapack, "dpotrf", spy)
    before = [i["num_threads"] for i in threadpoolctl.threadpool_info()
              if i["user_api"] == "blas"]
    trax_attr.inverse_gram(np.eye(4) * 2.0, 0.5)
    assert seen and all(n == 1 for n in seen[0])
    after = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    assert after == before  # restored
    monkeypatch.undo()  # the real rule: half this process's CPUs, at least one
    assert linalg.blas_threads() == max(1, len(os.sched_getaffinity(0)) // 2)


def test_inverse_gram_singular_falls_back_to_the_pseudo_inverse():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 8))  # fewer rows than k: XᵀX has rank 5
    gram = x.T @ x
    with pytest.warns(trax_attr.IllConditionedWarning, match="pseudo-inverse"):
        a = trax_attr.inverse_gram(gram, 0.0)
    np.testing.assert_allclose(a, np.linalg.pinv(gram, hermitian=True), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kwargs, message", [
    (dict(train_set_size=0), "train_set_size must be a positive integer"),
    (dict(lambda_reg=-1.0), "lambda_reg must be a finite number"),
    (dict(lambda_reg=float("nan")), "lambda_reg must be a finite number"),
    (dict(proj_dim=0), "proj_dim must be a positive integer"),
    (dict(task="segmentation"), "valid names are"),
    (dict(projector="sparse"), "valid names are"),
])
def test_bad_settings_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(tmp_path, **kwargs)


def test_bad_batches_are_refused(tmp_path, linear_checkpoints, data):
    traker = make(tmp_path)
    traker.load_checkpoint(linear_checkpoints[0], model_id=0)
    x, y = data[0]
    with pytest.raises(ValueError, match="num_samples=5 but the batch holds 10"):
        traker.featurize(batch=(x[:10], y[:10]), num_samples=5)
    with pytest.raises(ValueError, match="out of range"):
        traker.featurize(batch=(x[:10], y[:10]), inds=np.arange(235, 245))
    with pytest.raises(ValueError, match="duplicates"):
        traker.featurize(batch=(x[:3], y[:3]), inds=np.array([1, 1, 2]))
    with pytest.raises(ValueError, match="same leading batch axis"):
        traker.featurize(batch=(x[:10], y[:9]))


class PlainTask(trax_attr.ModelOutput):
    """A custom task that is not a dataclass: its repr holds a memory address."""

    def get_output(self, apply_fn, params, x, y):
        return trax_attr.ImageClassification().get_output(apply_fn, params, x, y)

    def get_out_to_loss_grad(self, apply_fn, params, batch):
        return trax_attr.ImageClassification().get_out_to_loss_grad(apply_fn, params, batch)


def test_store_reopens_with_an_equal_custom_task(tmp_path):
    make(tmp_path, task=PlainTask())
    make(tmp_path, task=PlainTask)                      # another instance, same task
    with pytest.raises(ValueError, match="task: stored"):
        make(tmp_path, task=trax_attr.ImageClassification(loss_temperature=2.0))


def test_reopened_store_exposes_proj_dim_and_features(tmp_path, linear_checkpoints, data):
    """A TRAKer that reopens a store (no load_checkpoint) knows k and reads the stored
    features; they equal the functional core's."""
    full_run(tmp_path, linear_checkpoints, data)
    reopened = make(tmp_path)
    assert reopened.proj_dim == 64
    train, target = data
    projector = trax_attr.rademacher(64, dtype=jnp.float32)
    phi, _ = trax_attr.featurize(linear_apply, linear_checkpoints[1], train, model_id=1,
                                 projector=projector)
    phi_t, _ = trax_attr.featurize(linear_apply, linear_checkpoints[1], target, model_id=1,
                                   projector=projector)
    np.testing.assert_allclose(reopened.train_features(1), phi, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reopened.target_features("exp", 1), phi_t, rtol=1e-5, atol=1e-6)
    assert reopened.targets_done("exp", 1) and not reopened.targets_done("other", 0)
    with pytest.raises(ValueError, match="is not an experiment"):
        reopened.target_features("other", 0)
    with pytest.raises(ValueError, match="proj_dim is known after"):
        _ = make(tmp_path / "empty").proj_dim


def test_parameter_leaves_larger_than_a_block(tmp_path, linear_checkpoints, data):
    """P generated in a loop of row blocks (leaf w: 640 rows, blocks of 16 and 100) inside
    the TRAKer's sharded featurize gives the same scores as one block per leaf."""
    params = linear_checkpoints[:1]
    _, reference = full_run(tmp_path / "one", params, data)
    for block_rows in (16, 100):
        blocked = trax_attr.rademacher(64, dtype=jnp.float32, block_rows=block_rows)
        _, scores = full_run(tmp_path / f"b{block_rows}", params, data, projector=blocked)
        np.testing.assert_allclose(scores, reference, rtol=1e-4,
                                   atol=1e-5 * np.abs(reference).max())


def test_a_second_traker_for_the_same_model_compiles_nothing(tmp_path, data,
                                                             linear_checkpoints):
    import jax

    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        first = full_run(tmp_path / "a", linear_checkpoints[:1], data, proj_dim=48)[1]
        assert compiles, "the listener saw no compilation at all"
        compiles.clear()
        second = full_run(tmp_path / "b", linear_checkpoints[:1], data, proj_dim=48)[1]
        assert compiles == [], f"a second TRAKer compiled {len(compiles)} functions again"
        np.testing.assert_array_equal(first, second)
        # other settings are another function: a new proj_dim compiles anew
        full_run(tmp_path / "c", linear_checkpoints[:1], data, proj_dim=40)
        assert compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_equal_linen_modules_share_a_featurizer_and_different_ones_do_not():
    import flax.linen as nn

    from trax_attr.models import as_model

    assert as_model(nn.Dense(4)).cache_key == as_model(nn.Dense(4)).cache_key
    assert as_model(nn.Dense(4)).cache_key != as_model(nn.Dense(5)).cache_key
    # a Model built by hand has no key: compiled per TRAKer, as before
    assert trax_attr.Model(linear_apply, lambda c: (c, None), "m").cache_key is None


def test_default_chunk_holds_8_mib_of_features_and_any_chunk_gives_the_same_scores(
        tmp_path, linear_checkpoints, data):
    from trax_attr.pipeline import chunk_rows

    assert chunk_rows(512) == 4096 and chunk_rows(2048) == 1024
    assert chunk_rows(2048, checkpoints=8) == 256 and chunk_rows(1 << 20) == 256
    # float64 XᵀX, so that only the chunking differs, not the float32 summation order
    _, reference = full_run(tmp_path / "one", linear_checkpoints, data, xtx_dtype=np.float64)
    _, chunked = full_run(tmp_path / "seven", linear_checkpoints, data, chunk_rows=7,
                          xtx_dtype=np.float64)
    np.testing.assert_allclose(chunked, reference, rtol=1e-5, atol=1e-6 * np.abs(reference).max())
    with pytest.raises(ValueError, match=r"chunk_rows must be a positive integer or None.*got 0"):
        make(tmp_path / "bad", chunk_rows=0)
