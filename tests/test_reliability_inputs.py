"""Bad input: every mistake raises an error that names the value and the fix."""

import jax.numpy as jnp
import numpy as np
import pytest

import trax_attr
from linear_model import linear_apply
from trax_attr import NonFiniteError, NonFiniteWarning

N, M, B = 64, 16, 32


@pytest.fixture(scope="module")
def data(digits):
    x, y = digits
    return (x[:N].copy(), y[:N].copy()), (x[1500:1500 + M].copy(), y[1500:1500 + M].copy())


def make(save_dir, model=linear_apply, **kwargs):
    kwargs = {"proj_dim": 16, "proj_dtype": jnp.float32, "lambda_reg": 1e-2, **kwargs}
    return trax_attr.TRAKer(model=model, task="image_classification", train_set_size=N,
                            save_dir=save_dir, **kwargs)


def featurize_all(traker, params, train, model_id=0):
    traker.load_checkpoint(params, model_id=model_id)
    for start in range(0, N, B):
        traker.featurize(batch=tuple(a[start:start + B] for a in train), num_samples=B)


def score_all(traker, params, target, model_id=0):
    traker.start_scoring_checkpoint(exp_name="test", checkpoint=params, model_id=model_id,
                                    num_targets=M)
    traker.score(batch=target, num_samples=M)
    return traker.finalize_scores(exp_name="test")


# --- non-finite values ---------------------------------------------------------------------
def test_nan_and_inf_inputs_raise_naming_the_examples(tmp_path, data, linear_checkpoints):
    (x, y), _ = data
    x = x.copy()
    x[3, 5], x[7, 0] = np.nan, np.inf
    traker = make(tmp_path)
    traker.load_checkpoint(linear_checkpoints[0], model_id=0)
    with pytest.raises(NonFiniteError, match=r"inputs of examples \[3, 7\].*nonfinite='zero'"):
        traker.featurize(batch=(x[:B], y[:B]), num_samples=B)
    done = traker.store.model_arrays(0, N, traker.proj_dim, mode="r")["done"]
    assert not done.any()  # nothing of the batch was written


def _inf_logits_apply(params, x):
    # an example whose pixel 0 is 1 gets an infinite logit: finite input, non-finite output
    return x @ params["w"] + params["b"] + jnp.where(x[:, :1] > 0.5, jnp.inf, 0.0)


def test_nonfinite_model_outputs_raise_naming_the_examples(tmp_path, data, linear_checkpoints):
    (x, y), _ = data
    x = x.copy()
    x[[2, 9], 0] = 1.0
    traker = make(tmp_path, model=_inf_logits_apply)
    traker.load_checkpoint(linear_checkpoints[0], model_id=0)
    with pytest.raises(NonFiniteError, match=r"examples \[2, 9\] \(2 in this batch\)"):
        traker.featurize(batch=(x[:B], y[:B]), num_samples=B)


def _nan_grad_apply(params, x):
    # sqrt(|s - x0|) is 0 (finite) where x0 == s, but its derivative in s is not
    return x @ params["w"] + params["b"] + jnp.sqrt(jnp.abs(params["s"] - x[:, :1]))


def test_nonfinite_gradients_with_finite_outputs_raise(tmp_path, data, linear_checkpoints):
    (x, y), _ = data
    x = x.copy()
    x[4, 0] = 1.0
    params = {**linear_checkpoints[0], "s": np.ones(1, np.float32)}
    logits = np.asarray(_nan_grad_apply(params, x[:B]))
    assert np.isfinite(logits).all()
    traker = make(tmp_path, model=_nan_grad_apply)
    traker.load_checkpoint(params, model_id=0)
    with pytest.raises(NonFiniteError, match=r"projected gradients of examples \[4\]"):
        traker.featurize(batch=(x[:B], y[:B]), num_samples=B)


def test_nonfinite_zero_stores_zero_rows_and_reports_how_many(tmp_path, data,
                                                              linear_checkpoints):
    (x, y), target = data
    x = x.copy()
    x[[1, 40, 41], 3] = np.nan
    params = linear_checkpoints[0]
    traker = make(tmp_path, nonfinite="zero")
    with pytest.warns(NonFiniteWarning, match=r"^1 training examples .*\[1\]"):
        with pytest.warns(NonFiniteWarning, match=r"^2 training examples .*\[40, 41\]"):
            featurize_all(traker, params, (x, y))
    np.testing.assert_array_equal(traker.zeroed_rows(0), [1, 40, 41])
    traker.finalize_features()
    scores = score_all(traker, params, target)
    assert np.isfinite(scores).all()
    np.testing.assert_array_equal(scores[[1, 40, 41]], 0)
    # the other rows equal a run without those examples' contributions: XᵀX skips them
    clean = make(tmp_path / "clean")
    keep = np.setdiff1d(np.arange(N), [1, 40, 41])
    x_clean = x.copy()
    x_clean[[1, 40, 41]] = 0
    featurize_all(clean, params, (x_clean, y))
    grads = np.array(clean.store.model_arrays(0, N, 16, mode="r")["grads"])
    stored = np.array(traker.store.model_arrays(0, N, 16, mode="r")["grads"])
    np.testing.assert_array_equal(stored[keep], grads[keep])
    np.testing.assert_array_equal(stored[[1, 40, 41]], 0)


def test_nonfinite_option_is_checked(tmp_path):
    with pytest.raises(ValueError, match=r"nonfinite='ignore' is not an option; use 'raise'"):
        make(tmp_path, nonfinite="ignore")


# --- labels, batch sizes, indices ----------------------------------------------------------
@pytest.mark.parametrize("labels, error, match", [
    (lambda y: y.astype(np.float32), TypeError, r"must be integers .* got dtype float32"),
    (lambda y: np.eye(10, dtype=np.int32)[y], ValueError, r"shape \(B,\), got \[32, 10\]"),
    (lambda y: np.where(np.arange(len(y)) == 5, 10, y), ValueError,
     r"labels \[10\] of examples \[5\] .* outside \[0, 10\)"),
    (lambda y: np.where(np.arange(len(y)) == 6, -1, y), ValueError,
     r"labels \[-1\] of examples \[6\]"),
])
def test_bad_labels_are_refused(tmp_path, data, linear_checkpoints, labels, error, match):
    (x, y), _ = data
    traker = make(tmp_path)
    traker.load_checkpoint(linear_checkpoints[0], model_id=0)
    with pytest.raises(error, match=match):
        traker.featurize(batch=(x[:B], labels(y[:B])), num_samples=B)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_samples": 31}, r"num_samples=31 but the batch holds 32 examples"),
    ({"inds": np.arange(31)}, r"inds must be 32 integers.* got int64\[31\]"),
    ({"inds": np.arange(32.0)}, r"inds must be 32 integers.* got float64\[32\]"),
    ({"inds": np.arange(40, 72)}, r"training rows \[64, 65, .*\] \(8 of this batch\) are out of "
                                  r"range \[0, 64\)"),
    ({"inds": np.r_[-1, np.arange(1, 32)]}, r"training rows \[-1\] \(1 of this batch\)"),
    ({"inds": np.r_[0, 0, np.arange(2, 32)]}, r"inds holds duplicates \[0\]"),
    ({"inds": np.arange(32), "num_samples": 16}, r"num_samples=16 but the batch holds 32"),
])
def test_bad_batch_sizes_and_indices_are_refused(tmp_path, data, linear_checkpoints, kwargs,
                                                 match):
    (x, y), _ = data
    traker = make(tmp_path)
    traker.load_checkpoint(linear_checkpoints[0], model_id=0)
    with pytest.raises(ValueError, match=match):
        traker.featurize(batch=(x[:B], y[:B]), **kwargs)


def test_batch_past_the_end_of_the_training_set_is_refused(tmp_path, data, linear_checkpoints):
    (x, y), _ = data
    traker = make(tmp_path)
    featurize_all(traker, linear_checkpoints[0], (x, y))
    with pytest.raises(ValueError, match=r"training rows \[64, 65"):
        traker.featurize(batch=(x[:B], y[:B]), num_samples=B)


def test_batch_partly_overlapping_finished_rows_computes_only_the_new_rows(
        tmp_path, data, linear_checkpoints):
    """The reference crashes here; resuming with shifted batches is safe."""
    (x, y), _ = data
    traker = make(tmp_path)
    traker.load_checkpoint(linear_checkpoints[0], model_id=0)
    for inds in (np.arange(0, 32), np.arange(16, 48), np.arange(32, 64)):
        traker.featurize(batch=(x[inds], y[inds]), inds=inds)
    clean = make(tmp_path / "clean")
    featurize_all(clean, linear_checkpoints[0], (x, y))
    got = traker.store.model_arrays(0, N, 16, mode="r")
    want = clean.store.model_arrays(0, N, 16, mode="r")
    np.testing.assert_array_equal(got["done"], want["done"])
    scale = np.abs(want["grads"]).max()
    np.testing.assert_allclose(got["grads"], want["grads"], rtol=1e-6, atol=1e-6 * scale)


# --- call order ----------------------------------------------------------------------------
def test_call_order_mistakes_are_refused(tmp_path, data, linear_checkpoints):
    (x, y), target = data
    params = linear_checkpoints[0]
    traker = make(tmp_path)
    with pytest.raises(ValueError, match=r"no checkpoint is loaded: call load_checkpoint"):
        traker.featurize(batch=(x[:B], y[:B]), num_samples=B)
    with pytest.raises(ValueError, match=r"nothing to finalize"):
        traker.finalize_features()
    traker.load_checkpoint(params, model_id=0)
    traker.featurize(batch=(x[:B], y[:B]), num_samples=B)
    with pytest.raises(ValueError, match=r"missing 32 of 64 training rows .*featurize them"):
        traker.finalize_features()
    with pytest.raises(ValueError, match=r"model_id=0 is not finalized; call finalize_features"):
        traker.start_scoring_checkpoint(exp_name="test", checkpoint=params, model_id=0,
                                        num_targets=M)
    with pytest.raises(ValueError, match=r"no experiment is started"):
        traker.score(batch=target, num_samples=M)
    traker.featurize(batch=(x[B:], y[B:]), num_samples=B)
    traker.finalize_features()
    assert traker.finalized(0)
    with pytest.raises(ValueError, match=r"model_id=0 is already finalized.*new model_id"):
        traker.featurize(batch=(x[:B], y[:B]), inds=np.arange(B))
    with pytest.raises(ValueError, match=r"experiment 'test' does not exist"):
        traker.finalize_scores(exp_name="test")
    traker.start_scoring_checkpoint(exp_name="test", checkpoint=params, model_id=0,
                                    num_targets=M)
    traker.score(batch=tuple(a[:8] for a in target), num_samples=8)
    with pytest.raises(ValueError, match=r"missing 8 of 16 targets .*allow_skip=True"):
        traker.finalize_scores(exp_name="test")
    with pytest.raises(ValueError, match=r"has num_targets=16, got 17; use a new exp_name"):
        traker.start_scoring_checkpoint(exp_name="test", checkpoint=params, model_id=0,
                                        num_targets=17)
    with pytest.raises(ValueError, match=r"model_id=3 was never featurized"):
        traker.start_scoring_checkpoint(exp_name="test", checkpoint=params, model_id=3,
                                        num_targets=M)


# --- checkpoints -----------------------------------------------------------------------------
def test_scoring_checkpoint_differing_from_the_featurized_one_is_refused(
        tmp_path, data, linear_checkpoints):
    (x, y), _ = data
    traker = make(tmp_path)
    featurize_all(traker, linear_checkpoints[0], (x, y))
    traker.finalize_features()
    other = {**linear_checkpoints[0], "b": linear_checkpoints[0]["b"] + 1e-6}
    with pytest.raises(ValueError, match=r"differs from the one featurized as model_id=0"):
        traker.start_scoring_checkpoint(exp_name="test", checkpoint=other, model_id=0,
                                        num_targets=M)
    with pytest.raises(ValueError, match=r"model_id=0 .* holds features of a different "
                                         r"checkpoint.*new model_id"):
        make(tmp_path).load_checkpoint(linear_checkpoints[1], model_id=0)


def test_checkpoint_with_wrong_shapes_is_refused(tmp_path, linear_checkpoints):
    params = linear_checkpoints[0]
    traker = make(tmp_path)
    traker.load_checkpoint(params, model_id=0)
    with pytest.raises(ValueError, match=r"differ in names or shapes .*w: 768"):
        traker.load_checkpoint({"w": np.zeros((64, 12), np.float32), "b": params["b"]}, 1)
    # same parameter count, other shapes, in a new process: caught by the stored shapes
    transposed = {"w": params["w"].T.copy(), "b": params["b"]}
    with pytest.raises(ValueError, match=r"parameter_shapes: stored \[\[10\], \[64, 10\]\], "
                                         r"given \[\[10\], \[10, 64\]\]"):
        make(tmp_path, model=lambda p, x: x @ p["w"].T + p["b"]).load_checkpoint(transposed, 1)


# --- settings --------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"proj_dim": 0}, r"proj_dim must be a positive integer, got 0"),
    ({"proj_dim": -8}, r"proj_dim must be a positive integer, got -8"),
    ({"proj_dim": 16.5}, r"proj_dim must be a positive integer, got 16.5"),
    ({"proj_dim": True}, r"proj_dim must be a positive integer, got True"),
    ({"lambda_reg": -1.0}, r"lambda_reg must be a finite number >= 0, got -1.0"),
    ({"lambda_reg": float("nan")}, r"lambda_reg must be a finite number >= 0, got nan"),
    ({"lambda_reg": float("inf")}, r"lambda_reg must be a finite number >= 0, got inf"),
    ({"lambda_reg": "0.1"}, r"lambda_reg must be a finite number >= 0, got '0.1'"),
    ({"lambda_reg": True}, r"lambda_reg must be a finite number >= 0, got True"),
    ({"train_set_size": 0}, r"train_set_size must be a positive integer .* got 0"),
])
def test_invalid_settings_are_refused(tmp_path, kwargs, match):
    kwargs = {"train_set_size": N, **kwargs}
    with pytest.raises(ValueError, match=match):
        trax_attr.TRAKer(model=linear_apply, save_dir=tmp_path,
                         **{"proj_dtype": jnp.float32, **kwargs})


def test_reopening_with_other_settings_is_refused(tmp_path):
    make(tmp_path)
    make(tmp_path, lambda_reg=0.5)  # λ is a finalize-time choice, not a store setting
    with pytest.raises(ValueError, match=r"seed: stored 0, given 3.*another save_dir"):
        make(tmp_path, seed=3)
