"""The three model kinds (function, flax.nnx, flax.linen) give the same scores."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

import trax_attr


class NnxCNN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.head = nnx.Linear(4 * 8 * 8, 10, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.bn(self.conv(x.reshape(-1, 8, 8, 1))))
        return self.head(h.reshape(h.shape[0], -1))


class LinenCNN(linen.Module):
    @linen.compact
    def __call__(self, x, train: bool = False):
        h = linen.Conv(4, (3, 3), name="conv")(x.reshape(-1, 8, 8, 1))
        h = jax.nn.relu(linen.BatchNorm(use_running_average=not train, name="bn")(h))
        return linen.Dense(10, name="head")(h.reshape(h.shape[0], -1))


@pytest.fixture(scope="module")
def nets():
    """An nnx CNN with non-trivial BatchNorm statistics, and the same weights as a linen
    variables dict and as a plain function's params."""
    model = NnxCNN(nnx.Rngs(0))
    model.bn.mean[...] = jax.random.normal(jax.random.key(1), (4,)) * 0.1
    model.bn.var[...] = jax.random.uniform(jax.random.key(2), (4,), minval=0.5, maxval=2.0)
    model.bn.scale[...] = jax.random.uniform(jax.random.key(3), (4,), minval=0.5, maxval=1.5)
    state = nnx.state(model)
    params = {
        "conv": {"kernel": state["conv"]["kernel"][...], "bias": state["conv"]["bias"][...]},
        "bn": {"scale": state["bn"]["scale"][...], "bias": state["bn"]["bias"][...]},
        "head": {"kernel": state["head"]["kernel"][...], "bias": state["head"]["bias"][...]},
    }
    stats = {"bn": {"mean": state["bn"]["mean"][...], "var": state["bn"]["var"][...]}}
    variables = {"params": params, "batch_stats": stats}

    def apply_fn(p, x):
        h = jax.lax.conv_general_dilated(
            x.reshape(-1, 8, 8, 1), p["conv"]["kernel"], (1, 1), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["conv"]["bias"]
        h = (h - stats["bn"]["mean"]) / jnp.sqrt(stats["bn"]["var"] + 1e-5)
        h = jax.nn.relu(h * p["bn"]["scale"] + p["bn"]["bias"])
        return h.reshape(h.shape[0], -1) @ p["head"]["kernel"] + p["head"]["bias"]

    return model, variables, apply_fn, params


def run_traker(model, checkpoint, data, tmp_path, **kwargs):
    (x, y), (xt, yt) = data
    traker = trax_attr.TRAKer(model=model, train_set_size=len(x), save_dir=tmp_path,
                              lambda_reg=1e-2, proj_dtype=jnp.float32, **kwargs)
    traker.load_checkpoint(checkpoint, model_id=0)
    for start in range(0, len(x), 64):
        traker.featurize(batch=(x[start:start + 64], y[start:start + 64]))
    traker.finalize_features()
    traker.start_scoring_checkpoint("t", checkpoint, model_id=0, num_targets=len(xt))
    traker.score(batch=(xt, yt))
    return traker.finalize_scores("t")


@pytest.mark.parametrize("projector", ["identity", "rademacher"])
def test_three_model_kinds_agree(nets, digits, tmp_path, projector):
    model, variables, apply_fn, params = nets
    x, y = digits
    data = ((x[:192], y[:192]), (x[1500:1510], y[1500:1510]))
    kinds = {
        "nnx": (model, None),
        "linen": (trax_attr.linen_model(LinenCNN(), train=False), variables),
        "function": (apply_fn, params),
    }
    scores = {name: run_traker(m, ckpt, data, tmp_path / name, projector=projector, proj_dim=128)
              for name, (m, ckpt) in kinds.items()}
    reference = scores["function"]
    assert np.abs(reference).max() > 0
    for name in ("nnx", "linen"):
        np.testing.assert_allclose(scores[name], reference, rtol=1e-4,
                                   atol=1e-4 * np.abs(reference).max(), err_msg=name)


def test_nnx_batchnorm_is_held_fixed(nets, digits):
    """Running statistics are used (eval mode), and the user's module is untouched."""
    model, _, apply_fn, params = nets
    adapted = trax_attr.as_model(model)
    p, state = adapted.split(None)
    x = digits[0][:5]
    np.testing.assert_allclose(adapted.apply(p, state, x), apply_fn(params, x), rtol=1e-5,
                               atol=1e-5)
    assert model.bn.use_running_average is False


def test_nnx_checkpoint_as_state(nets, digits):
    model, _, apply_fn, params = nets
    adapted = trax_attr.as_model(model)
    x = digits[0][:5]
    for checkpoint in (nnx.state(model), nnx.state(model, nnx.Param)):
        p, state = adapted.split(checkpoint)
        np.testing.assert_allclose(adapted.apply(p, state, x), apply_fn(params, x), rtol=1e-5,
                                   atol=1e-5)


def test_grad_wrt_selects_before_differentiating(nets, digits):
    _, _, apply_fn, params = nets
    x, y = digits
    batch = (x[:4], y[:4])
    phi_head, _ = trax_attr.featurize(apply_fn, params, batch, grad_wrt="head/*")
    assert phi_head.shape == (4, 4 * 8 * 8 * 10 + 10)
    phi_all, _ = trax_attr.featurize(apply_fn, params, batch)
    d_all = phi_all.shape[1]
    # the head's gradient is the same block of the full gradient (up to 1/√d)
    selection = trax_attr.select(params)
    start = sum(s for p, s in zip(selection.paths, selection.sizes) if not p.startswith("head"))
    np.testing.assert_allclose(phi_head * np.sqrt(phi_head.shape[1]),
                               phi_all[:, start:] * np.sqrt(d_all), rtol=1e-5, atol=1e-6)
    by_predicate = trax_attr.select(params, lambda path, leaf: path.endswith("kernel"))
    assert by_predicate.paths == ("conv/kernel", "head/kernel")


def test_grad_wrt_matching_nothing_lists_paths(nets):
    params = nets[3]
    with pytest.raises(ValueError, match="selects no parameter.*conv/kernel"):
        trax_attr.select(params, "encoder/*")


def test_bad_model_and_checkpoint_types(nets):
    with pytest.raises(TypeError, match="model must be"):
        trax_attr.as_model(42)
    with pytest.raises(TypeError, match="'params' entry"):
        trax_attr.linen_model(LinenCNN()).split({"weights": 1})
    with pytest.raises(TypeError, match="nnx.Module of the same structure"):
        trax_attr.as_model(nets[0]).split([1, 2])
