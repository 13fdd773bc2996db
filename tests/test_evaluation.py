"""trax_attr.evaluation: LDS against hand-computed values and scipy, retraining, baselines."""

import jax
import numpy as np
import pytest
import scipy.stats

from trax_attr import evaluation as ev


# --- LDS -------------------------------------------------------------------------------

def hand_example():
    """3 training examples, 2 targets, 4 subsets.

    predictions = masks @ scores:
      target 0: [1, 2, 3, 6]  vs margins [.1, .2, .3, .4]  -> ranks equal, rho = 1
      target 1: [3, -1, 0, 2] vs margins [1, 2, 3, 4]: ranks [4, 1, 2, 3] vs [1, 2, 3, 4],
                d = [3, -1, -1, -1], rho = 1 - 6 * 12 / (4 * 15) = -0.2
    LDS = (1 - 0.2) / 2 = 0.4.
    """
    scores = np.array([[1.0, 3.0], [2.0, -1.0], [3.0, 0.0]])
    masks = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]], bool)
    margins = np.array([[0.1, 1.0], [0.2, 2.0], [0.3, 3.0], [0.4, 4.0]])
    return scores, masks, margins


def test_lds_hand_computed():
    result = ev.lds(*hand_example())
    np.testing.assert_allclose(result.per_target, [1.0, -0.2], atol=1e-12)
    assert result.mean == pytest.approx(0.4, abs=1e-12)
    # two targets: the bootstrap means can only be 1, 0.4 or -0.2
    assert -0.2 - 1e-12 <= result.low <= result.mean <= result.high <= 1.0 + 1e-12


def test_lds_matches_scipy_with_ties():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(40, 7))
    scores[:, 3] = np.round(scores[:, 3])          # ties in the predictions
    masks = rng.random((30, 40)) < 0.5
    margins = np.round(rng.normal(size=(30, 7)), 1)  # ties in the margins
    result = ev.lds(scores, masks, margins)
    predictions = masks.astype(float) @ scores
    expected = [scipy.stats.spearmanr(predictions[:, j], margins[:, j]).statistic
                for j in range(7)]
    np.testing.assert_allclose(result.per_target, expected, atol=1e-12)
    assert result.mean == pytest.approx(np.mean(expected), abs=1e-12)


def test_lds_nan_handling():
    scores, masks, margins = hand_example()
    scores = np.concatenate([scores, scores], axis=1)
    margins = np.concatenate([margins, margins], axis=1)
    margins[:, 2] = 5.0          # constant margins: undefined, excluded
    margins[1, 3] = np.nan       # one diverged retraining: that subset is dropped
    result = ev.lds(scores, masks, margins)
    predictions = masks.astype(float) @ scores
    keep = [0, 2, 3]
    expected3 = scipy.stats.spearmanr(predictions[keep, 3], margins[keep, 3]).statistic
    assert np.isnan(result.per_target[2])
    np.testing.assert_allclose(result.per_target[[0, 1, 3]], [1.0, -0.2, expected3], atol=1e-12)
    assert result.mean == pytest.approx(np.mean([1.0, -0.2, expected3]), abs=1e-12)
    assert np.isfinite([result.low, result.high]).all()


def test_lds_all_undefined_warns_and_returns_nan():
    scores, masks, _ = hand_example()
    with pytest.warns(RuntimeWarning, match="LDS is undefined"):
        result = ev.lds(scores, masks, np.ones((4, 2)))
    assert np.isnan([result.mean, result.low, result.high]).all()
    assert np.isnan(result.per_target).all()


def test_lds_bootstrap_is_seeded_and_covers_the_mean():
    rng = np.random.default_rng(2)
    scores, masks, margins = rng.normal(size=(30, 50)), rng.random((20, 30)) < .5, rng.normal(size=(20, 50))
    a = ev.lds(scores, masks, margins, seed=3)
    b = ev.lds(scores, masks, margins, seed=3)
    assert (a.low, a.high) == (b.low, b.high)
    assert a.low < a.mean < a.high
    # the percentile interval of a mean of 50 values is about ±1.96 σ/√50
    half = 1.96 * np.nanstd(a.per_target) / np.sqrt(50)
    assert (a.high - a.low) / 2 == pytest.approx(half, rel=0.25)


@pytest.mark.parametrize("kwargs, match", [
    (dict(masks=np.ones((4, 5), bool)), "masks has 5 columns"),
    (dict(margins=np.ones((4, 3))), "margins has shape"),
    (dict(masks=np.full((4, 3), 2)), "masks must be a bool array"),
    (dict(confidence=1.5), "confidence"),
    (dict(n_bootstrap=0), "n_bootstrap"),
])
def test_lds_rejects_bad_input(kwargs, match):
    scores, masks, margins = hand_example()
    args = dict(scores=scores, masks=masks, margins=margins) | kwargs
    with pytest.raises(ValueError, match=match):
        ev.lds(args.pop("scores"), args.pop("masks"), args.pop("margins"), **args)


# --- retraining ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_problem(digits):
    x, y = digits
    return (x[:300], y[:300]), (x[1500:1520], y[1500:1520])


def test_subset_retraining_deterministic_and_cached(small_problem, tmp_path, monkeypatch):
    train, targets = small_problem
    kwargs = dict(num_models=4, alpha=0.5, steps=150, lr=1e-2, cache_dir=tmp_path)
    masks, margins = ev.subset_retraining(jax.random.key(0), train, targets, **kwargs)
    assert masks.shape == (4, 300) and masks.dtype == np.bool_
    assert margins.shape == (4, 20) and margins.dtype == np.float32
    assert (masks.sum(1) == 150).all()
    assert len({m.tobytes() for m in masks}) == 4
    # the models learned: most targets classified correctly
    assert (margins > 0).mean() > 0.8
    assert len(list(tmp_path.glob("subsets-*.npz"))) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("a cached result was retrained")

    monkeypatch.setattr(ev.retraining, "train_nnx_models", no_training)
    cached = ev.subset_retraining(jax.random.key(0), train, targets, **kwargs)
    np.testing.assert_array_equal(cached[0], masks)
    np.testing.assert_array_equal(cached[1], margins)
    # another key is another cache entry (and would retrain)
    with pytest.raises(AssertionError, match="retrained"):
        ev.subset_retraining(jax.random.key(1), train, targets, **kwargs)


def test_models_trained_together_equal_models_trained_alone(small_problem):
    """vmap over models must not mix them: model i alone gives model i of the batch."""
    (x, y), (xt, yt) = small_problem
    subsets = ev.retraining._subset_indices(jax.random.key(5), 300, 150, 3)
    make = lambda rngs: ev.MLP((64, 16, 10), rngs)  # noqa: E731
    together = ev.train_nnx_models(jax.random.key(7), make, x, y, subsets, steps=40, lr=1e-2)
    margins = ev.nnx_margins(*together, xt, yt)
    alone = ev.train_nnx_models(jax.random.key(7), make, x, y, subsets[:1], steps=40, lr=1e-2)
    np.testing.assert_allclose(ev.nnx_margins(*alone, xt, yt)[0], margins[0],
                               rtol=1e-5, atol=1e-5)
    # and the models do differ from each other
    assert np.abs(margins[0] - margins[1]).max() > 1e-2


def test_same_init_models_differ_by_their_data_alone(small_problem):
    """same_init: one initialisation and minibatch order for all models, so models on the
    same rows are identical, models on other rows are not, and each equals model 0 of an
    independent run (whose model 0 uses fold_in(key, 0) as well)."""
    (x, y), (xt, yt) = small_problem
    subsets = ev.retraining._subset_indices(jax.random.key(5), 300, 150, 2)
    subsets = np.concatenate([subsets, subsets[:1]])          # rows of model 0 again
    make = lambda rngs: ev.MLP((64, 16, 10), rngs)  # noqa: E731
    paired = ev.nnx_margins(*ev.train_nnx_models(jax.random.key(7), make, x, y, subsets,
                                                 steps=40, lr=1e-2, same_init=True), xt, yt)
    np.testing.assert_allclose(paired[2], paired[0], rtol=1e-6, atol=1e-6)
    assert np.abs(paired[1] - paired[0]).max() > 1e-3
    for i in range(2):
        alone = ev.train_nnx_models(jax.random.key(7), make, x, y, subsets[i:i + 1],
                                    steps=40, lr=1e-2)
        np.testing.assert_allclose(ev.nnx_margins(*alone, xt, yt)[0], paired[i],
                                   rtol=1e-5, atol=1e-5)
    independent = ev.nnx_margins(*ev.train_nnx_models(jax.random.key(7), make, x, y, subsets,
                                                      steps=40, lr=1e-2), xt, yt)
    assert np.abs(independent[2] - independent[0]).max() > 1e-3   # another seed for model 2


def test_subset_retraining_rejects_bad_input(small_problem):
    train, targets = small_problem
    with pytest.raises(TypeError, match="jax.random.key"):
        ev.subset_retraining(0, train, targets)
    with pytest.raises(ValueError, match="alpha"):
        ev.subset_retraining(jax.random.key(0), train, targets, alpha=0.0)
    with pytest.raises(ValueError, match="integer labels"):
        ev.subset_retraining(jax.random.key(0), (train[0], train[0][:, 0]), targets)


# --- baselines and comparison ----------------------------------------------------------

def test_baselines_against_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(9, 5)), rng.normal(size=(4, 5))
    a[2] = 0.0
    np.testing.assert_allclose(ev.grad_dot_scores(a, b), a @ b.T, rtol=1e-5, atol=1e-6)
    cos = ev.grad_cosine_scores(a, b)
    for i in (0, 5):
        for j in range(4):
            expected = a[i] @ b[j] / np.linalg.norm(a[i]) / np.linalg.norm(b[j])
            assert cos[i, j] == pytest.approx(expected, abs=1e-6)
    assert (cos[2] == 0).all()
    r = ev.random_scores(jax.random.key(0), 9, 4)
    assert r.shape == (9, 4) and r.dtype == np.float32
    np.testing.assert_array_equal(r, ev.random_scores(jax.random.key(0), 9, 4))
    assert not np.array_equal(r, ev.random_scores(jax.random.key(1), 9, 4))
    with pytest.raises(ValueError, match="same checkpoint and projector"):
        ev.grad_dot_scores(a, b[:, :3])


def test_compare_scores():
    rng = np.random.default_rng(0)
    b = rng.normal(size=(50, 3))
    a = b.copy()
    a[:, 1] = -b[:, 1]
    a[:, 2] = b[:, 2] + 0.1
    agreement = ev.compare_scores(a, b, k=5)
    np.testing.assert_allclose(agreement.pearson, [1, -1, 1], atol=1e-12)
    np.testing.assert_allclose(agreement.spearman, [1, -1, 1], atol=1e-12)
    assert agreement.topk_overlap[0] == 1 and agreement.topk_overlap[2] == 1
    assert agreement.topk_overlap[1] == 0     # top of -b is the bottom of b
    assert agreement.top_opponents[0] == 1 and agreement.top_opponents[1] == 0
    assert agreement.sign_agreement[0] == 1 and agreement.sign_agreement[1] == 0
    np.testing.assert_allclose(agreement.max_rel_diff,
                               [0, 2, 0.1 / np.abs(b[:, 2]).max()], atol=1e-12)
    table = agreement.table()
    assert "top-5 proponents" in table and len(table.splitlines()) == 7
    pearson_row = table.splitlines()[1].split()
    assert pearson_row[0] == "pearson" and float(pearson_row[2]) == pytest.approx(-1)
    with pytest.raises(ValueError, match="differ in shape"):
        ev.compare_scores(a, b[:, :2])
    with pytest.raises(ValueError, match="must be finite"):
        ev.compare_scores(np.where(a > 1, np.nan, a), b)
    with pytest.raises(ValueError, match="k must be an integer"):
        ev.compare_scores(a, b, k=51)
