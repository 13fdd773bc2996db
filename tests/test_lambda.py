"""λ is a finalize-time choice: one featurized store serves any λ; "auto" is the default."""

import jax.numpy as jnp
import numpy as np
import pytest

import trax_attr
from linear_model import linear_apply
from trax_attr.store import checksums

N, M, K = 200, 10, 48


@pytest.fixture()
def data(digits):
    x, y = digits
    return (x[:N], y[:N]), (x[1500:1500 + M], y[1500:1500 + M])


def make(tmp_path, **kwargs):
    return trax_attr.TRAKer(model=linear_apply, train_set_size=N, save_dir=tmp_path,
                            proj_dim=K, proj_dtype=jnp.float32, **kwargs)


def featurize(traker, checkpoints, train):
    for model_id, params in enumerate(checkpoints):
        traker.load_checkpoint(params, model_id=model_id)
        traker.featurize(batch=train, num_samples=N)


def score(traker, checkpoints, target, exp="exp"):
    for model_id, params in enumerate(checkpoints):
        if not traker.targets_done(exp, model_id):
            traker.start_scoring_checkpoint(exp, params, model_id=model_id, num_targets=M)
            traker.score(batch=target, num_samples=M)
    return traker.finalize_scores(exp)


def test_one_store_finalized_at_two_lambdas_equals_two_stores(tmp_path, data,
                                                              linear_checkpoints):
    train, target = data
    shared = make(tmp_path / "shared")
    featurize(shared, linear_checkpoints, train)
    by_lambda = {}
    for lam in (0.01, 3.0):
        shared.finalize_features(lambda_reg=lam)
        assert {i: r["value"] for i, r in shared.lambdas().items()} == {0: lam, 1: lam}
        by_lambda[lam] = score(shared, linear_checkpoints, target)
        alone = make(tmp_path / f"alone-{lam}", lambda_reg=lam)
        featurize(alone, linear_checkpoints, train)
        alone.finalize_features()
        np.testing.assert_array_equal(score(alone, linear_checkpoints, target), by_lambda[lam])
    assert np.abs(by_lambda[0.01] - by_lambda[3.0]).max() > 1e-3 * np.abs(by_lambda[3.0]).max()
    meta = shared.store.experiment_meta("exp")["scores"]
    assert meta["lambda"]["0"]["lambda_reg"] == 3.0 and meta["model_ids"] == [0, 1]


def test_another_lambda_reuses_the_stored_xtx_without_reading_the_features(
        tmp_path, data, linear_checkpoints, monkeypatch):
    train, _ = data
    traker = make(tmp_path)
    featurize(traker, linear_checkpoints, train)
    traker.finalize_features(lambda_reg=0.1)
    grads = str(traker.store.array_path(0, "grads"))

    class NoRows(checksums.RowStream):
        def __init__(self, path, *args):
            assert str(path) != grads, "the features were read again"
            super().__init__(path, *args)

    def refuse_features(real):
        def read(path, *args):
            assert str(path) != grads, "the features were read again"
            return real(path, *args)
        return read

    # every read of a local store's rows goes through these three (trax_attr.store.store)
    local = trax_attr.store.store
    monkeypatch.setattr(local, "RowStream", NoRows)
    monkeypatch.setattr(local, "read_rows", refuse_features(local.read_rows))
    monkeypatch.setattr(local, "verify_file", refuse_features(local.verify_file))
    traker.finalize_features(lambda_reg=5.0)
    assert traker.lambdas()[0]["value"] == 5.0
    xtx = np.asarray(traker.store.finished(0, "xtx", (K, K), np.float32), np.float64)
    inverse = traker.store.finished(0, "inverse", (K, K), np.float32)
    np.testing.assert_allclose(inverse, np.linalg.inv(xtx + 5.0 * np.eye(K)), rtol=1e-4,
                               atol=1e-6 * np.abs(inverse).max())


def test_auto_is_the_default_deterministic_and_the_documented_rule(tmp_path, data,
                                                                   linear_checkpoints):
    train, target = data
    runs = []
    for name in ("a", "b"):
        traker = make(tmp_path / name)
        featurize(traker, linear_checkpoints, train)
        traker.finalize_features()
        runs.append((traker.lambdas(), score(traker, linear_checkpoints, target)))
    assert runs[0][0] == runs[1][0]
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    for model_id, record in runs[0][0].items():
        phi = traker.train_features(model_id).astype(np.float64)
        expected = 0.75 * np.sum(phi ** 2) / N          # 0.75 · tr(ΦᵀΦ) / n
        assert record["lambda_reg"] == "auto"
        np.testing.assert_allclose(record["value"], expected, rtol=1e-5)


def test_an_experiment_never_mixes_lambdas(tmp_path, data, linear_checkpoints):
    train, target = data
    traker = make(tmp_path)
    featurize(traker, linear_checkpoints, train)
    traker.finalize_features(lambda_reg=0.5)
    score(traker, linear_checkpoints, target)
    traker.finalize_features(model_ids=[1], lambda_reg=2.0)
    with pytest.raises(ValueError, match=r"different λ .*model_id=0: lambda_reg=0.5.*"
                                         r"model_id=1: lambda_reg=2.0"):
        traker.finalize_scores("exp")
    traker.finalize_features(model_ids=[0], lambda_reg=2.0)  # one λ again: scored
    assert np.isfinite(traker.finalize_scores("exp")).all()


def test_lambda_arguments_are_checked(tmp_path, data, linear_checkpoints):
    with pytest.raises(ValueError, match="lambda_reg must be a finite number >= 0"):
        make(tmp_path, lambda_reg="automatic")
    traker = make(tmp_path)
    featurize(traker, linear_checkpoints[:1], data[0])
    with pytest.raises(ValueError, match="lambda_reg must be a finite number >= 0, got -1"):
        traker.finalize_features(lambda_reg=-1)


def test_functional_core_uses_the_same_auto_rule(tmp_path, data, linear_checkpoints):
    train, target = data
    traker = make(tmp_path)
    featurize(traker, linear_checkpoints, train)
    traker.finalize_features()
    scores = score(traker, linear_checkpoints, target)
    ids = range(len(linear_checkpoints))
    phi = np.stack([traker.train_features(i) for i in ids])
    q = np.stack([np.asarray(traker.store.model_arrays(i, N, K, mode="r")["out_to_loss"])
                  for i in ids])
    phi_t = np.stack([traker.target_features("exp", i) for i in ids])
    functional = np.asarray(trax_attr.trak_scores(phi, q, phi_t))   # lambda_reg="auto"
    assert np.abs(functional - scores).max() <= 1e-6 * np.abs(scores).max()
