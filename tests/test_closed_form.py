"""TRAKer and the functional core against a numpy float64 closed form of DESIGN.md."""

import jax
import numpy as np
import pytest

import trax_attr
from linear_model import linear_apply


def closed_form_features(params, x, y):
    """Exact margin gradients of a linear softmax model, leaves in pytree order (b, w)."""
    w, b = params["w"].astype(np.float64), params["b"].astype(np.float64)
    logits = x.astype(np.float64) @ w + b
    onehot = np.eye(10)[y]
    others = np.where(onehot == 1, -np.inf, logits)
    s = np.exp(others - others.max(1, keepdims=True))
    s /= s.sum(1, keepdims=True)
    dfdg = onehot - s                                      # (n, 10)
    grad_w = x[:, :, None].astype(np.float64) * dfdg[:, None, :]   # (n, 64, 10)
    g = np.concatenate([dfdg, grad_w.reshape(len(x), -1)], axis=1)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    q = 1 - p[np.arange(len(y)), y]
    return g / np.sqrt(g.shape[1]), q


def closed_form_scores(checkpoints, train, target, lambda_reg):
    total, q_total = 0, 0
    for params in checkpoints:
        phi, q = closed_form_features(params, *train)
        phi_t, _ = closed_form_features(params, *target)
        a = np.linalg.inv(phi.T @ phi + lambda_reg * np.eye(phi.shape[1]))
        total = total + phi @ a @ phi_t.T
        q_total = q_total + q
    m = len(checkpoints)
    return (total / m) * (q_total / m)[:, None]


@pytest.fixture(scope="module")
def problem(digits, linear_checkpoints):
    x, y = digits
    train = (x[:1500], y[:1500])
    target = (x[1500:1530], y[1500:1530])
    expected = closed_form_scores(linear_checkpoints, train, target, lambda_reg=0.1)
    return train, target, expected


def test_traker_matches_closed_form(problem, linear_checkpoints, tmp_path):
    train, target, expected = problem
    traker = trax_attr.TRAKer(model=linear_apply, task="image_classification",
                              train_set_size=len(train[0]), save_dir=tmp_path,
                              projector="identity", lambda_reg=0.1)
    for model_id, params in enumerate(linear_checkpoints):
        traker.load_checkpoint(params, model_id=model_id)
        for start in range(0, 1500, 256):
            batch = tuple(a[start:start + 256] for a in train)
            traker.featurize(batch=batch, num_samples=len(batch[0]))
    traker.finalize_features()
    for model_id, params in enumerate(linear_checkpoints):
        traker.start_scoring_checkpoint(exp_name="test", checkpoint=params, model_id=model_id,
                                        num_targets=len(target[0]))
        traker.score(batch=target, num_samples=len(target[0]))
    scores = traker.finalize_scores(exp_name="test")
    assert scores.shape == (1500, 30) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_functional_core_in_user_jit(problem, linear_checkpoints):
    """The same scores without TRAKer, from the pure functions inside one jit."""
    train, target, expected = problem

    @jax.jit
    def attribute(checkpoints, train, target):
        phis, qs, targets = [], [], []
        for model_id, params in enumerate(checkpoints):
            phi, q = trax_attr.featurize(linear_apply, params, train, model_id=model_id)
            phi_t, _ = trax_attr.featurize(linear_apply, params, target, model_id=model_id)
            phis.append(phi), qs.append(q), targets.append(phi_t)
        stack = jax.numpy.stack
        return trax_attr.trak_scores(stack(phis), stack(qs), stack(targets), lambda_reg=0.1)

    scores = np.asarray(attribute(linear_checkpoints, train, target))
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_featurize_with_a_traced_model_id(problem, linear_checkpoints):
    """model_id (and so the projection key) may be a traced argument of the user's jit:
    the features equal those of a concrete id."""
    train, _, _ = problem
    params = linear_checkpoints[1]
    projector = trax_attr.rademacher(64, dtype=jax.numpy.float32)
    traced = jax.jit(lambda m: trax_attr.featurize(linear_apply, params, train, model_id=m,
                                                   projector=projector))
    phi, q = trax_attr.featurize(linear_apply, params, train, model_id=1, projector=projector)
    scale = np.abs(np.asarray(phi)).max()   # one jit fuses differently from eager calls
    np.testing.assert_allclose(np.asarray(traced(1)[0]), np.asarray(phi), atol=1e-5 * scale)
    np.testing.assert_allclose(np.asarray(traced(1)[1]), np.asarray(q), rtol=1e-5)
    assert np.abs(np.asarray(traced(0)[0]) - np.asarray(phi)).max() > 0.1 * scale  # another P


def test_functional_core_equals_traker_to_1e6(problem, linear_checkpoints, tmp_path):
    """One engine: trak_scores on the rows the TRAKer stored runs the TRAKer's own kernels
    over the same chunks, so the two agree to float32 rounding of one value (1e-6)."""
    train, target, _ = problem
    traker = trax_attr.TRAKer(model=linear_apply, task="image_classification",
                              train_set_size=len(train[0]), save_dir=tmp_path,
                              projector="identity", lambda_reg=0.1, chunk_rows=400)
    for model_id, params in enumerate(linear_checkpoints):
        traker.load_checkpoint(params, model_id=model_id)
        traker.featurize(batch=train, num_samples=len(train[0]))
    traker.finalize_features()
    for model_id, params in enumerate(linear_checkpoints):
        traker.start_scoring_checkpoint("test", params, model_id=model_id,
                                        num_targets=len(target[0]))
        traker.score(batch=target, num_samples=len(target[0]))
    scores = traker.finalize_scores("test")
    ids = range(len(linear_checkpoints))
    phi = np.stack([traker.train_features(i) for i in ids])
    q = np.stack([traker.store.model_arrays(i, 1500, phi.shape[2], mode="r")["out_to_loss"]
                  for i in ids])
    phi_t = np.stack([traker.target_features("test", i) for i in ids])
    functional = np.asarray(jax.jit(lambda a, b, c: trax_attr.trak_scores(
        a, b, c, lambda_reg=0.1, chunk_rows=400))(phi, q, phi_t))
    relative = np.abs(functional - scores).max() / np.abs(scores).max()
    assert relative <= 1e-6, relative
    # the functional featurize gives the stored rows themselves
    direct, direct_q = trax_attr.featurize(linear_apply, linear_checkpoints[1], train,
                                           model_id=1, mesh=traker.mesh)
    np.testing.assert_array_equal(np.asarray(direct), phi[1])
    np.testing.assert_array_equal(np.asarray(direct_q), q[1])
