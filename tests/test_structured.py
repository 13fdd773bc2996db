"""Kronecker-structured projection equals the dense projection with the explicit
block-diagonal (P_in ⊗ P_out, ..., dense fallback) matrix applied to the explicit
per-example gradient."""

import chex
import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import trax_attr
from trax_attr.gradients import per_example_grads, select
from trax_attr.projection import matrix_block, projection_key, rademacher
from trax_attr.projection.kronecker import kronecker, layer_keys
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
            p_in = matrix_block(rademacher(proj.r_in, dtype=jnp.float32), k_in, 0, d_in)
            p_out = matrix_block(rademacher(proj.r_out, dtype=jnp.float32), k_out, 0, d_out)
            block = np.asarray(jnp.kron(p_in, p_out), np.float64)
            big[offsets[i]:offsets[i + 1], col:col + block.shape[1]] = block
            col += block.shape[1]
    for i, p in enumerate(selection.paths):
        if p not in layer_dims:
            size = selection.sizes[i]
            big[offsets[i]:offsets[i + 1], col:] = fb_full[fb_row:fb_row + size]
            fb_row += size
    return big / np.sqrt(d)


def assert_kronecker_exact(module, checkpoint, batch, layer_dims, proj=None):
    """featurize(projector=kronecker) == per-example gradients (formed densely) times the
    explicit block-diagonal Kronecker matrix; ``layer_dims`` maps each covered kernel's
    path to its (d_in, d_out). Returns the max relative error."""
    proj = proj or kronecker(3, 4, fallback_dim=20, dtype=jnp.float32)
    phi, _ = trax_attr.featurize(module, checkpoint, batch, projector=proj, seed=3,
                                 model_id=2)
    model = trax_attr.as_model(module)
    params, state = model.split(checkpoint)
    selection = select(params)
    selected, rest = selection.split(params)
    task = get_task("image_classification")
    grads = jax.jit(lambda *a: per_example_grads(task, model, selection, *a))(
        selected, rest, state, batch)
    g = np.concatenate([np.asarray(a, np.float64) for a in grads], axis=1)
    assert set(layer_dims) <= set(selection.paths), (sorted(layer_dims), selection.paths)
    fb_paths = {p for p in selection.paths if p not in layer_dims}
    big = explicit_matrix(proj, projection_key(3, 2), selection, fb_paths, layer_dims)
    expected = g @ big
    assert phi.shape == expected.shape
    np.testing.assert_allclose(np.asarray(phi), expected, rtol=1e-5,
                               atol=1e-5 * np.abs(expected).max())
    return float(np.abs(np.asarray(phi) - expected).max() / np.abs(expected).max())


def kernel_dims(params, dims=lambda p, shape: shape):
    """{path: (d_in, d_out)} of every leaf named kernel or embedding."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    out = {}
    for path, leaf in flat:
        name = trax_attr.gradients.leaf_path(path)
        if name.endswith(("kernel", "embedding")):
            out[name] = tuple(dims(name, np.shape(leaf)))
    return out


@pytest.mark.parametrize("module,shape", [(MLP(), (64,)), (TokenMLP(), (5, 8))])
def test_structured_equals_explicit_kronecker(module, shape):
    x = jax.random.normal(jax.random.key(1), (6,) + shape)
    y = jnp.arange(6) % 10
    variables = jax.jit(module.init)(jax.random.key(0), x)
    assert_kronecker_exact(module, variables, (x, y), kernel_dims(variables["params"]))


class TinyTransformer(nn.Module):
    """Embedding, self-attention (DenseGeneral projections), MLP, tied output (attend)."""

    @nn.compact
    def __call__(self, ids):  # ids (B, T) int
        embed = nn.Embed(10, 8, name="embed")
        h = embed(ids)
        h = h + nn.MultiHeadDotProductAttention(2, name="attn")(h)
        h = nn.LayerNorm(name="norm")(h)
        h = h + nn.Dense(8, name="mlp")(nn.gelu(h))
        return embed.attend(h.mean(axis=1))


def _general_dims(path, shape):
    """DenseGeneral kernels: query/key/value (in, heads, dh), out (heads, dh, out)."""
    if "/out/" in path:
        return (shape[0] * shape[1], shape[2])
    if len(shape) == 3:
        return (shape[0], shape[1] * shape[2])
    return shape


def test_structured_exact_linen_embed_attention_attend():
    ids = jax.random.randint(jax.random.key(1), (5, 6), 0, 10)
    y = jnp.arange(5) % 10
    module = TinyTransformer()
    variables = jax.jit(module.init)(jax.random.key(0), ids)
    dims = kernel_dims(variables["params"], _general_dims)
    assert "embed/embedding" in dims and "attn/out/kernel" in dims
    assert_kronecker_exact(module, variables, (ids, y), dims)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):  # x (B, 7, 7, 2)
        x = nn.relu(nn.Conv(4, (3, 3), padding="SAME")(x))
        x = nn.relu(nn.Conv(3, (3, 2), strides=(2, 1), padding=((1, 0), (0, 1)),
                            kernel_dilation=(1, 2))(x))
        x = nn.Conv(2, 3, padding="CIRCULAR")(x.reshape(x.shape[0], -1, 3))  # falls back
        x = nn.Dense(6)(x.reshape(x.shape[0], -1))
        return nn.Dense(10, dot_general=_double_dot)(x)  # not x W: falls back


def _double_dot(*args, **kwargs):
    return 2.0 * jax.lax.dot_general(*args, **kwargs)


def test_structured_exact_linen_conv():
    x = jax.random.normal(jax.random.key(1), (4, 7, 7, 2))
    y = jnp.arange(4) % 10
    module = CNN()
    variables = jax.jit(module.init)(jax.random.key(0), x)
    dims = kernel_dims(variables["params"], lambda p, s: (int(np.prod(s[:-1])), s[-1]))
    del dims["Conv_2/kernel"], dims["Dense_1/kernel"]  # not covered: dense fallback
    assert_kronecker_exact(module, variables, (x, y), dims)


def test_traker_with_kronecker_matches_pure_featurize(tmp_path):
    """TRAKer(projector=kronecker(...)) stores the same rows as featurize()."""
    module = MLP()
    x = jax.random.normal(jax.random.key(1), (8, 64))
    y = jnp.arange(8) % 10
    variables = jax.jit(module.init)(jax.random.key(0), x)
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


# --- flax.nnx --------------------------------------------------------------------------
class NnxMLP(nnx.Module):
    """The twin of LinenNamedMLP: same layers, same parameter paths."""

    def __init__(self, rngs):
        self.l1 = nnx.Linear(64, 32, rngs=rngs)
        self.norm = nnx.LayerNorm(32, rngs=rngs)
        self.l2 = nnx.Linear(32, 24, rngs=rngs)
        self.head = nnx.Linear(24, 10, rngs=rngs)

    def __call__(self, x):
        x = self.norm(nnx.relu(self.l1(x)))
        return self.head(nnx.relu(self.l2(x)))


class LinenNamedMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm(name="norm")(nn.relu(nn.Dense(32, name="l1")(x)))
        return nn.Dense(10, name="head")(nn.relu(nn.Dense(24, name="l2")(x)))


class NnxTransformer(nnx.Module):
    """Embedding, attention (LinearGeneral projections), LayerNorm, Linear, attend."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(10, 8, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(2, 8, decode=False, rngs=rngs)
        self.norm = nnx.LayerNorm(8, rngs=rngs)
        self.mlp = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, ids):
        h = self.embed(ids)
        h = h + self.attn(h)
        h = self.norm(h)
        h = h + self.mlp(nnx.gelu(h))
        return self.embed.attend(h.mean(axis=1))


class NnxCNN(nnx.Module):
    def __init__(self, rngs):
        self.c1 = nnx.Conv(2, 4, (3, 3), padding="SAME", rngs=rngs)
        self.c2 = nnx.Conv(4, 3, (3, 2), strides=(2, 1), padding="VALID", rngs=rngs)
        self.head = nnx.Linear(3 * 3 * 6, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.c2(nnx.relu(self.c1(x))))
        return self.head(x.reshape(x.shape[0], -1))


def nnx_params(module):
    return nnx.split(module, nnx.Param, ...)[1]


def test_structured_exact_nnx_mlp_and_linen_twin():
    x = jax.random.normal(jax.random.key(1), (6, 64))
    y = jnp.arange(6) % 10
    module = NnxMLP(nnx.Rngs(0))
    dims = kernel_dims(nnx_params(module))
    assert sorted(dims) == ["head/kernel", "l1/kernel", "l2/kernel"]
    assert_kronecker_exact(module, None, (x, y), dims)

    # the linen twin with the same weights gives the same features: same paths, same keys
    twin = LinenNamedMLP()
    params = nnx.to_pure_dict(nnx_params(module))
    variables = {"params": params}
    np.testing.assert_allclose(np.asarray(twin.apply(variables, x)), np.asarray(module(x)),
                               rtol=1e-6)
    proj = kronecker(3, 4, fallback_dim=20, dtype=jnp.float32)
    phi_nnx, _ = trax_attr.featurize(module, None, (x, y), projector=proj, seed=5)
    phi_linen, _ = trax_attr.featurize(twin, variables, (x, y), projector=proj, seed=5)
    np.testing.assert_allclose(np.asarray(phi_nnx), np.asarray(phi_linen), rtol=1e-5,
                               atol=1e-6 * float(jnp.abs(phi_linen).max()))


def test_structured_exact_nnx_transformer():
    ids = jax.random.randint(jax.random.key(1), (5, 6), 0, 10)
    y = jnp.arange(5) % 10
    module = NnxTransformer(nnx.Rngs(0))
    dims = kernel_dims(nnx_params(module), _general_dims)
    assert {"embed/embedding", "attn/query/kernel", "attn/out/kernel", "mlp/kernel"} <= set(dims)
    assert_kronecker_exact(module, None, (ids, y), dims)


def test_structured_exact_nnx_conv():
    x = jax.random.normal(jax.random.key(1), (4, 7, 7, 2))
    y = jnp.arange(4) % 10
    module = NnxCNN(nnx.Rngs(0))
    dims = kernel_dims(nnx_params(module), lambda p, s: (int(np.prod(s[:-1])), s[-1]))
    assert_kronecker_exact(module, None, (x, y), dims)


def test_nnx_taps_leave_flax_untouched():
    """After a tapped trace the nnx classes are flax's own again."""
    before = {c: dict(vars(c)) for c in (nnx.Linear, nnx.LinearGeneral, nnx.Embed, nnx.Conv)}
    module = NnxTransformer(nnx.Rngs(0))
    ids = jnp.zeros((2, 3), jnp.int32)
    phi = jax.eval_shape(lambda: trax_attr.featurize(
        module, None, (ids, jnp.zeros(2, jnp.int32)), projector=kronecker(2, 2,
                                                                          fallback_dim=4))[0])
    assert phi.shape == (2, 6 * 2 * 2 + 4)  # six tapped kernels: the taps were on
    for c, attrs in before.items():
        assert dict(vars(c)) == attrs


class NnxTiedReadout(nnx.Module):
    """l1's kernel is used by its layer and read directly (a tied readout)."""

    def __init__(self, rngs):
        self.l1 = nnx.Linear(10, 16, rngs=rngs)
        self.l2 = nnx.Linear(16, 16, rngs=rngs)

    def __call__(self, x):
        h = nnx.tanh(self.l2(nnx.tanh(self.l1(x))))
        return h @ self.l1.kernel[...].T


def test_kernel_used_outside_its_layer_takes_the_fallback():
    x = jax.random.normal(jax.random.key(1), (5, 10))
    y = jnp.arange(5) % 10
    module = NnxTiedReadout(nnx.Rngs(0))
    with pytest.warns(UserWarning, match="'l1/kernel' is also used outside"):
        assert_kronecker_exact(module, None, (x, y), {"l2/kernel": (16, 16)})


def test_traker_with_nnx_model_and_kronecker(tmp_path):
    """TRAKer end to end with an nnx transformer: stored rows equal featurize(), two
    batches and a second checkpoint compile the featurize step once."""
    module = NnxTransformer(nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (8, 6), 0, 10)
    y = jnp.arange(8) % 10
    proj = kronecker(2, 3, fallback_dim=8, dtype=jnp.float32)
    traker = trax_attr.TRAKer(model=module, task="image_classification", train_set_size=8,
                              save_dir=str(tmp_path), projector=proj, lambda_reg=1e-2)
    other = nnx.state(NnxTransformer(nnx.Rngs(1)), nnx.Param)
    compiled = trax_attr.parallel.featurize._cache_size()
    for model_id, ckpt in enumerate((None, other)):
        traker.load_checkpoint(ckpt, model_id=model_id)
        traker.featurize((ids[:4], y[:4]), num_samples=4)
        traker.featurize((ids[4:], y[4:]), num_samples=4)
    assert trax_attr.parallel.featurize._cache_size() - compiled == 1
    n_layers = 6  # embedding, query, key, value, out, mlp
    assert traker.proj_dim == n_layers * 2 * 3 + 8
    for model_id, ckpt in enumerate((None, other)):
        phi, _ = trax_attr.featurize(module, ckpt, (ids, y), projector=proj,
                                     model_id=model_id)
        stored = traker.store.model_arrays(model_id, 8, traker.proj_dim)
        np.testing.assert_allclose(np.asarray(stored["grads"]), np.asarray(phi), rtol=1e-5,
                                   atol=1e-6 * float(jnp.abs(phi).max()))
    traker.finalize_features()
    traker.start_scoring_checkpoint("t", None, model_id=0, num_targets=3)
    traker.score((ids[:3], y[:3]), num_samples=3)
    scores = np.asarray(traker.finalize_scores("t"))
    assert scores.shape == (8, 3) and np.isfinite(scores).all()


def test_structured_featurize_does_not_retrace():
    """The structured path (taps, untapped-use check, projection) traces once per shape."""
    module = NnxTransformer(nnx.Rngs(0))
    model = trax_attr.as_model(module)
    params, state = model.split(None)
    selection = select(params)
    selected, rest = selection.split(params)
    f = trax_attr.engine.Featurizer(get_task("image_classification"), model, selection,
                                    kronecker(2, 2, fallback_dim=4))
    fn = jax.jit(chex.assert_max_traces(
        lambda ckpt, batch: trax_attr.engine.features(f, ckpt, batch), n=1))
    key = projection_key(0, 0)
    for seed in (1, 2):
        ids = jax.random.randint(jax.random.key(seed), (4, 6), 0, 10)
        ckpt = trax_attr.engine.Checkpoint(selected, rest, state, key, None)
        phi, q = fn(ckpt, (ids, jnp.arange(4) % 10))
        assert phi.shape == (4, 6 * 4 + 4) and np.isfinite(np.asarray(phi)).all()


def _shapes(jaxpr) -> list[tuple[int, ...]]:
    """Shapes of every value the equations of ``jaxpr`` (and its sub-jaxprs) make."""
    shapes = []
    for eqn in jaxpr.eqns:
        shapes += [tuple(getattr(var.aval, "shape", ())) for var in eqn.outvars]
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    shapes += _shapes(inner)
    return shapes


def test_structured_never_forms_the_per_example_gradient_of_a_covered_kernel():
    """For a 256 x 512 Dense kernel and a batch of 8, no value of the structured featurize
    program has a batch axis and 256 * 512 entries per example; the dense projector's
    program does (the per-example gradients), so the check tells them apart."""

    class Wide(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(10, use_bias=False)(nn.relu(nn.Dense(512, use_bias=False)(x)))

    batch = 8
    x = jnp.ones((batch, 256))
    y = jnp.arange(batch) % 10
    ckpt = jax.jit(Wide().init)(jax.random.key(0), x[:1])

    def per_example_kernel_grads(projector):
        jaxpr = jax.make_jaxpr(lambda c, b: trax_attr.featurize(Wide(), c, b,
                                                                projector=projector))(ckpt, (x, y))
        return [s for s in _shapes(jaxpr.jaxpr)
                if len(s) >= 2 and s[0] == batch and np.prod(s[1:]) >= 256 * 512]

    dense = per_example_kernel_grads(trax_attr.rademacher(64, dtype=jnp.float32))
    structured = per_example_kernel_grads(kronecker(4, 4, fallback_dim=8, dtype=jnp.float32))
    assert dense, "the dense program should hold (B, 256 * 512) per-example gradients"
    assert structured == [], structured
