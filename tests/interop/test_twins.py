"""Must-show 1: a torch CNN with BatchNorm (eval) and its Flax twin give the same TRAK.

Three routes on the same weights: the nnx twin (weights moved with torch_to_flax), the
torch module converted to JAX (backend="converted") and per-example gradients in torch
(backend="torch"). Margins, 1 - p, per-example gradients and scores agree; float32
compute throughout.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="interop tests need torch (the interop extra)")

from trax_attr import interop  # noqa: E402
import trax_attr  # noqa: E402
from torch_twins import (  # noqa: E402,F401 (fixtures are used by name)
    N_TARGETS, N_TRAIN, digits_images, nnx_cnn, torch_cnn)
from trax_attr.gradients import per_example_grads  # noqa: E402
from trax_attr.tasks import ImageClassification, classification_margin, one_minus_p  # noqa: E402


def torch_margin(logits, label):
    """g_y - logsumexp_{j≠y} g_j of one example, in torch: ``(C,), ()`` -> ``()``."""
    is_label = torch.arange(logits.shape[-1]) == label
    correct = torch.where(is_label, logits, torch.zeros_like(logits)).sum()
    return correct - torch.logsumexp(logits.masked_fill(is_label, float("-inf")), dim=-1)


def torch_one_minus_p(logits, labels):
    """1 - softmax(g)_y of a batch in torch, ``(B, C), (B,)`` -> ``(B,)``."""
    return 1 - torch.softmax(logits, -1)[torch.arange(len(labels)), labels]

# n_train = 300 < d = 1434, so the identity-projector Gram matrix is singular and needs a
# ridge. Its mean diagonal is 2.4 and its top eigenvalue 1.7e3; λ = 1 bounds the
# condition number by ~2e3, where float32 gradients that differ in the 7th digit give
# scores that differ by ~1e-5 (measured: λ = 0.1 gives up to 6e-5, λ = 1e-4 up to 2e-3).
LAMBDA = 1.0


def rel_diff(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def twins(torch_cnn):
    from flax import nnx

    flax_model = interop.torch_to_flax(torch_cnn, nnx_cnn())
    graphdef, params, rest = nnx.split(flax_model, nnx.Param, ...)

    def torch_layout_apply(torch_params, x):
        """The nnx twin as a function of torch-named, torch-layout parameters."""
        flax_params = interop.torch_to_flax(torch_params, params, module=torch_cnn, strict=False)
        return nnx.merge(graphdef, flax_params, rest)(x)

    torch_params = {n: jnp.asarray(p.detach().numpy()) for n, p in torch_cnn.named_parameters()}
    return {
        "flax": (flax_model, None),
        "converted": (interop.torch_model(torch_cnn, "converted"), torch_cnn.state_dict()),
        "torch": (interop.torch_model(torch_cnn, "torch"), torch_cnn.state_dict()),
        "flax_torch_layout": (trax_attr.callable_model(torch_layout_apply), torch_params),
    }


def test_margins_and_one_minus_p_agree(twins, torch_cnn, digits_images):
    (x, y), _ = digits_images
    task = ImageClassification()
    with torch.no_grad():
        logits = torch_cnn(torch.from_numpy(x))
    want_margin = torch.func.vmap(torch_margin)(logits, torch.from_numpy(y).long()).numpy()
    want_q = torch_one_minus_p(logits, torch.from_numpy(y).long()).numpy()
    assert want_q.min() >= 0 and np.median(want_q) < 0.5, "the CNN should be trained"
    for name in ("flax", "converted"):
        model, checkpoint = twins[name]
        model = trax_attr.as_model(model)
        params, state = model.split(checkpoint)
        out = np.asarray(model.apply(params, state, jnp.asarray(x)))
        margin = jax.vmap(classification_margin)(jnp.asarray(out), jnp.asarray(y))
        q = one_minus_p(jnp.asarray(out), jnp.asarray(y))
        assert rel_diff(margin, want_margin) <= 1e-5, name
        assert rel_diff(q, want_q) <= 1e-5, name
    del task


def test_per_example_gradients_agree(twins, torch_cnn, digits_images):
    """Flax gradients, mapped to torch layout, against converted and torch-native ones."""
    from flax import nnx

    (x, y), _ = digits_images
    x, y = x[:64], y[:64]
    task = ImageClassification()
    flax_model, _ = twins["flax"]
    graphdef, params, rest = nnx.split(flax_model, nnx.Param, ...)

    def output(p, image, label):
        return task.get_output(lambda q, xi: nnx.merge(graphdef, q, rest)(xi), p, image, label)

    flax_grads = jax.vmap(jax.grad(output), in_axes=(None, 0, 0))(params, x, y)
    flax_grads = interop.flax_to_torch(flax_grads, torch_cnn, strict=False, as_numpy=True,
                                      batched=True)

    grads = {}
    for name in ("converted", "torch"):
        model, checkpoint = twins[name]
        params_t, state_t = model.split(checkpoint)
        sel = trax_attr.select(params_t)
        g = per_example_grads(task, model, sel, *sel.split(params_t), state_t,
                              (jnp.asarray(x), jnp.asarray(y)))
        grads[name] = {n: np.asarray(v) for n, v in zip(sel.paths, g)}
    for name in ("converted", "torch"):
        for leaf, value in flax_grads.items():
            got = grads[name][leaf].reshape(value.shape)
            assert rel_diff(got, value) <= 1e-4, (name, leaf, rel_diff(got, value))


def run_traker(model, checkpoint, train, targets, tmp_path, **kwargs):
    traker = trax_attr.TRAKer(model=model, task="image_classification", train_set_size=N_TRAIN,
                              save_dir=tmp_path, lambda_reg=LAMBDA, proj_dtype=jnp.float32,
                              xtx_dtype=np.float64, **kwargs)
    traker.load_checkpoint(checkpoint, model_id=0)
    for start in range(0, N_TRAIN, 150):  # two equal batches: one compilation
        batch = tuple(a[start:start + 150] for a in train)
        traker.featurize(batch=batch, num_samples=len(batch[0]))
    traker.finalize_features()
    traker.start_scoring_checkpoint(exp_name="t", checkpoint=checkpoint, model_id=0,
                                    num_targets=N_TARGETS)
    traker.score(batch=targets, num_samples=N_TARGETS)
    return traker.finalize_scores(exp_name="t")


# route -> (what TRAKer gets as model=, its checkpoint, backend=)
ROUTES = {
    "flax": lambda t, cnn: (t["flax"][0], None, None),
    "converted": lambda t, cnn: (cnn, cnn.state_dict(), None),
    "torch": lambda t, cnn: (cnn, cnn.state_dict(), "torch"),
    "flax_torch_layout": lambda t, cnn: (*t["flax_torch_layout"], None),
}


def scores_of(routes, twins, torch_cnn, digits_images, tmp_path_factory, **kwargs):
    train, targets = digits_images
    out = {}
    for name in routes:
        model, ckpt, backend = ROUTES[name](twins, torch_cnn)
        out[name] = run_traker(model, ckpt, train, targets, tmp_path_factory.mktemp(name),
                               backend=backend, **kwargs)
    return out


def test_identity_scores_agree(twins, torch_cnn, digits_images, tmp_path_factory):
    scores = scores_of(("flax", "converted", "torch"), twins, torch_cnn, digits_images,
                       tmp_path_factory, projector="identity")
    for name in ("converted", "torch"):
        result = interop.compare(scores[name], scores["flax"])
        print(f"identity, {name} vs flax:\n{result}")
        assert result.max_rel_diff.max() <= 1e-4, (name, str(result))


def test_rademacher_scores_agree(twins, torch_cnn, digits_images, tmp_path_factory):
    """Same seed and the same (torch) parameter layout: the same projection matrix on every
    route, so the scores agree to float rounding."""
    scores = scores_of(("converted", "torch", "flax_torch_layout", "flax"), twins, torch_cnn,
                       digits_images, tmp_path_factory, projector="rademacher", proj_dim=128,
                       seed=3)
    for name in ("torch", "flax_torch_layout"):
        result = interop.compare(scores[name], scores["converted"])
        print(f"rademacher k=128, {name} vs converted:\n{result}")
        assert result.pearson.min() > 0.9999, (name, str(result))
    # The nnx twin in its own layout (HWIO kernels, its own leaf order) projects a
    # permuted gradient, i.e. with another random matrix: the same attribution only up to
    # the projection's randomness (measured: median Pearson 0.52 at k = 128), far from the
    # 0 of unrelated scores.
    result = interop.compare(scores["flax"], scores["converted"])
    print(f"rademacher k=128, flax (own layout) vs converted:\n{result}")
    assert np.median(result.pearson) > 0.3, str(result)
