"""Kronecker-structured projection equals the dense projection with the explicit
block-diagonal (P_in ⊗ P_out, ..., dense fallback) matrix applied to the explicit
per-example gradient."""

import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import trax_attr
from trax_attr.gradients import per_example_grads, select
from trax_attr.projection import Projector, matrix_block, projection_key
from trax_attr.structured import kronecker, layer_keys
from trax_attr.tasks import get_task


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x))
        x = nn.LayerNorm()(x)
        x = nn.relu(nn.Dense(24)(x))
        return nn.Dense(10)(x)


class TokenMLP(nn.Module):
    """Dense layers applied per position (sum over t in the gradient), one shared twice."""

    @nn.compact
    def __call__(self, x):  # x (B, T, 8)
        shared = nn.Dense(8, name="shared")
        x = nn.tanh(shared(nn.tanh(shared(x))))
        x = nn.Dense(16)(x).mean(axis=1)
        return nn.Dense(10)(x)


def explicit_matrix(proj, key, selection, fb_paths, layer_dims):
    """The full (d, k) block-diagonal matrix, built with jnp.kron, in float64."""
    d = selection.grad_dim
    covered = [p for p in selection.paths if p in layer_dims]
    fb_sizes = [s for p, s in zip(selection.paths, selection.sizes) if p in fb_paths]
    k = len(covered) * proj.r_in * proj.r_out + (proj.fallback.proj_dim if fb_sizes else 0)
    big = np.zeros((d, k))
    fb_full = np.asarray(matrix_block(proj.fallback, key, 0, sum(fb_sizes)), np.float64) \
        if fb_sizes else None
    offsets = np.cumsum((0,) + selection.sizes)
    col, fb_row = 0, 0
    for i, p in enumerate(selection.paths):
        if p in layer_dims:
            d_in, d_out = layer_dims[p]
            k_in, k_out = layer_keys(key, p)
            p_in = matrix_block(Projector("rademacher", proj.r_in, "float32"), k_in, 0, d_in)
            p_out = matrix_block(Projector("rademacher", proj.r_out, "float32"), k_out, 0, d_out)
            block = np.asarray(jnp.kron(p_in, p_out), np.float64)
            big[offsets[i]:offsets[i + 1], col:col + block.shape[1]] = block
            col += block.shape[1]
    for i, p in enumerate(selection.paths):
        if p not in layer_dims:
            size = selection.sizes[i]
            big[offsets[i]:offsets[i + 1], col:] = fb_full[fb_row:fb_row + size]
            fb_row += size
    return big / np.sqrt(d)


@pytest.mark.parametrize("module,shape", [(MLP(), (64,)), (TokenMLP(), (5, 8))])
def test_structured_equals_explicit_kronecker(module, shape):
    x = jax.random.normal(jax.random.key(1), (6,) + shape)
    y = jnp.arange(6) % 10
    variables = module.init(jax.random.key(0), x)
    proj = kronecker(3, 4, fallback_dim=20, dtype=jnp.float32)
    phi, _ = trax_attr.featurize(module, variables, (x, y), projector=proj, seed=3, model_id=2)

    model = trax_attr.as_model(module)
    params, state = model.split(variables)
    selection = select(params)
    selected, rest = selection.split(params)
    grads = per_example_grads(get_task("image_classification"), model, selection, selected,
                              rest, state, (x, y))
    g = np.concatenate([np.asarray(a, np.float64) for a in grads], axis=1)
    layer_dims = {p: np.shape(leaf) for p, leaf in zip(selection.paths, selected)
                  if p.endswith("kernel")}
    fb_paths = {p for p in selection.paths if p not in layer_dims}
    big = explicit_matrix(proj, projection_key(3, 2), selection, fb_paths, layer_dims)
    expected = g @ big
    assert phi.shape == expected.shape
    np.testing.assert_allclose(np.asarray(phi), expected, rtol=1e-5,
                               atol=1e-5 * np.abs(expected).max())


def test_traker_with_kronecker_matches_pure_featurize(tmp_path):
    """TRAKer(projector=kronecker(...)) stores the same rows as featurize()."""
    module = MLP()
    x = jax.random.normal(jax.random.key(1), (8, 64))
    y = jnp.arange(8) % 10
    variables = module.init(jax.random.key(0), x)
    proj = kronecker(2, 3, fallback_dim=8, dtype=jnp.float32)
    traker = trax_attr.TRAKer(model=module, task="image_classification", train_set_size=8,
                              save_dir=str(tmp_path), projector=proj, lambda_reg=1e-2)
    traker.load_checkpoint(variables, model_id=0)
    traker.featurize((x, y), num_samples=8)
    assert traker.proj_dim == 3 * 2 * 3 + 8
    phi, _ = trax_attr.featurize(module, variables, (x, y), projector=proj)
    stored = traker.store.model_arrays(0, 8, traker.proj_dim)
    np.testing.assert_allclose(np.asarray(stored["grads"]), np.asarray(phi), rtol=1e-5,
                               atol=1e-6 * float(jnp.abs(phi).max()))
    traker.finalize_features()
    traker.start_scoring_checkpoint("t", variables, model_id=0, num_targets=3)
    traker.score((x[:3], y[:3]), num_samples=3)
    scores = np.asarray(traker.finalize_scores("t"))
    assert scores.shape == (8, 3) and np.isfinite(scores).all()


def test_kronecker_needs_tapped_model():
    with pytest.raises(TypeError, match="apply_tapped"):
        trax_attr.featurize(lambda p, x: x @ p["w"], {"w": jnp.ones((4, 10))},
                            (jnp.ones((2, 4)), jnp.zeros(2, jnp.int32)),
                            projector=kronecker(2, 2))
