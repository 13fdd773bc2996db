"""torch checkpoints (state_dicts, paths), backend dispatch, and compare() against scipy."""

import numpy as np
import pytest
import scipy.stats

torch = pytest.importorskip("torch", reason="interop tests need torch (the interop extra)")
from torch import nn  # noqa: E402

from trax_attr import interop  # noqa: E402
import trax_attr  # noqa: E402
from trax_attr.evaluation import ScoreAgreement  # noqa: E402
from torch_twins import (  # noqa: E402,F401 (fixtures are used by name)
    TorchCNN, digits_images, torch_cnn)


def test_checkpoints_as_state_dict_path_or_module(torch_cnn, tmp_path):
    model = trax_attr.as_model(torch_cnn)
    path = tmp_path / "cnn.pt"
    torch.save(torch_cnn.state_dict(), path)
    want, want_state = model.split(torch_cnn.state_dict())
    for checkpoint in (str(path), path, torch_cnn, None):
        params, state = model.split(checkpoint)
        assert sorted(params) == sorted(n for n, _ in torch_cnn.named_parameters())
        assert sorted(state) == ["bn1.running_mean", "bn1.running_var"]
        for name in want:
            np.testing.assert_array_equal(np.asarray(params[name]), np.asarray(want[name]))


def test_checkpoint_mismatch_is_named(torch_cnn, tmp_path):
    """Missing, unexpected and reshaped tensors are named together, when loaded."""
    from trax_attr.models.checkpoints import CheckpointMismatchError

    model = interop.torch_model(torch_cnn)
    state = dict(torch_cnn.state_dict(), **{"fc.weight": torch.zeros(3, 16),
                                             "head.weight": torch.zeros(2)})
    del state["fc.bias"]
    with pytest.raises(CheckpointMismatchError,
                       match=r"missing from the checkpoint: fc.bias; in the checkpoint but not "
                             r"the module: head.weight; shapes differ \(checkpoint vs module\): "
                             r"fc.weight: \(3, 16\) vs \(10, 16\)"):
        model.split(state)
    wrapped = {f"module.{k}": v for k, v in torch_cnn.state_dict().items()}
    with pytest.raises(ValueError, match=r"'module.' \(a DataParallel wrapper\): strip"):
        model.split(wrapped)
    training = {"model": torch_cnn.state_dict(), "optimizer": {}, "epoch": 3}
    with pytest.raises(ValueError, match=r"under 'model' .*: pass checkpoint\['model'\]"):
        model.split(training)
    path = tmp_path / "not_a_state_dict.pt"
    torch.save([1, 2], path)
    with pytest.raises(TypeError, match="not a state_dict"):
        model.split(path)


@pytest.mark.parametrize("backend", ["converted", "torch"])
def test_checkpoint_in_other_dtype_or_without_counters(torch_cnn, backend):
    """As module.load_state_dict: a float16 checkpoint is cast to the module's float32 (the
    torch route used to fail inside its callback), and a state_dict without BatchNorm's
    num_batches_tracked (a counter no forward pass reads) is accepted."""
    model = interop.torch_model(torch_cnn, backend=backend)
    full = torch_cnn.state_dict()
    half = {k: v.half() if v.is_floating_point() else v for k, v in full.items()
            if not k.endswith("num_batches_tracked")}
    params, state = model.split(half)
    for name, tensor in full.items():
        if tensor.is_floating_point():
            got = (params | state)[name]
            assert got.dtype == np.float32, name
            np.testing.assert_array_equal(np.asarray(got), tensor.half().float().numpy())


def test_backend_choice():
    module = TorchCNN()
    assert trax_attr.as_model(module).name.endswith("backend=converted)")
    assert trax_attr.as_model(module, backend="torch").name.endswith("backend=torch)")
    with pytest.raises(ValueError, match="backend='jax' is not known"):
        trax_attr.as_model(module, backend="jax")
    with pytest.raises(ValueError, match="applies to torch modules only"):
        trax_attr.as_model(lambda p, x: x, backend="torch")


def test_torch_backend_grad_wrt_and_untouched_module(torch_cnn, digits_images):
    """grad_wrt picks the same leaves by torch name in both routes; the user's module
    stays in its own mode."""
    (x, y), _ = digits_images
    torch_cnn.train()
    try:
        features = {}
        for backend in ("converted", "torch"):
            model = interop.torch_model(torch_cnn, backend)
            features[backend] = trax_attr.featurize(model, torch_cnn.state_dict(),
                                                    (x[:16], y[:16]), grad_wrt="fc.*")
        assert torch_cnn.training
    finally:
        torch_cnn.eval()
    (phi_c, q_c), (phi_t, q_t) = features["converted"], features["torch"]
    assert phi_c.shape == (16, 170)
    np.testing.assert_allclose(np.asarray(phi_t), np.asarray(phi_c), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(q_t), np.asarray(q_c), rtol=1e-5, atol=1e-7)


def test_custom_jax_task_on_torch_backend(torch_cnn, digits_images):
    """A task written in JAX for JAX models runs on backend="torch" as it is: the torch
    module is a differentiable JAX function, so the features equal the converted route's."""
    import jax
    import jax.numpy as jnp

    (x, y), _ = digits_images

    class SquaredLogit(trax_attr.ModelOutput):
        """f = (logit of class 0)², Q = 1: any differentiable JAX code of the logits."""

        def get_output(self, apply_fn, params, image, label):
            return apply_fn(params, image[None])[0, 0] ** 2 + 0.0 * label

        def get_out_to_loss_grad(self, apply_fn, params, batch):
            return jnp.ones(len(batch[0]))

    features = {backend: trax_attr.featurize(interop.torch_model(torch_cnn, backend), None,
                                             (x[:16], y[:16]), task=SquaredLogit())
                for backend in ("converted", "torch")}
    (phi_c, _), (phi_t, _) = features["converted"], features["torch"]
    np.testing.assert_allclose(np.asarray(phi_t), np.asarray(phi_c), rtol=1e-4,
                               atol=1e-6 * np.abs(np.asarray(phi_c)).max())
    # and plain jax.grad of a batched loss (no vmap): one torch VJP for the whole batch
    model = interop.torch_model(torch_cnn, "torch")
    params, state = model.split(None)
    loss = lambda p: jnp.sum(model.apply(p, state, jnp.asarray(x[:8])) ** 2)  # noqa: E731
    reference = interop.torch_model(torch_cnn, "converted")
    want = jax.grad(lambda p: jnp.sum(reference.apply(p, state, jnp.asarray(x[:8])) ** 2))(params)
    got = jax.grad(loss)(params)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4,
                                   atol=1e-5 * np.abs(want[name]).max())


def test_compare_against_scipy():
    rng = np.random.default_rng(0)
    b = rng.normal(size=(200, 5))
    a = b + 0.3 * rng.normal(size=b.shape)
    result = interop.compare(a, b, k=10)
    for j in range(5):
        assert result.pearson[j] == pytest.approx(scipy.stats.pearsonr(a[:, j], b[:, j])[0])
        assert result.spearman[j] == pytest.approx(scipy.stats.spearmanr(a[:, j], b[:, j])[0])
        top = len(set(np.argsort(-a[:, j])[:10]) & set(np.argsort(-b[:, j])[:10])) / 10
        bottom = len(set(np.argsort(a[:, j])[:10]) & set(np.argsort(b[:, j])[:10])) / 10
        assert result.top_proponents[j] == top and result.top_opponents[j] == bottom
        assert result.sign_agreement[j] == np.mean(np.sign(a[:, j]) == np.sign(b[:, j]))
        assert result.max_rel_diff[j] == pytest.approx(
            np.abs(a[:, j] - b[:, j]).max() / np.abs(b[:, j]).max())
    same = interop.compare(b, b)
    assert np.allclose(same.pearson, 1) and same.max_rel_diff.max() == 0
    text = str(result)
    assert "pearson" in text and "top-10 opponents" in text and len(text.splitlines()) == 7
    assert text == result.table() and interop.Comparison is ScoreAgreement
    with pytest.raises(ValueError, match="differ in shape"):
        interop.compare(a, b[:, :3])


def test_unconvertible_module_points_to_torch_backend():
    class RunningMax(nn.Module):  # cummax: outside the converted op table
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x.cummax(-1)[0])

    model = interop.torch_model(RunningMax(), "converted")  # exported when first applied
    x, y = np.ones((2, 4), np.float32), np.zeros(2, np.int32)
    with pytest.raises(interop.UnsupportedOpError, match='(?s)cummax.*backend="torch"'):
        trax_attr.featurize(model, None, (x, y))


def test_dlpack_hand_over_shares_memory():
    """The torch route's hand-over is zero-copy on CPU in both directions (the arrays the
    callbacks read, the tensors they return)."""
    import jax
    import jax.numpy as jnp

    from trax_attr.interop import callback

    array = jnp.arange(64 * 33, dtype=jnp.float32).reshape(64, 33)
    tensor = callback._from_jax(array, torch.device("cpu"))
    assert tensor.data_ptr() == array.unsafe_buffer_pointer()
    grads = torch.randn(64, 300)
    assert callback._to_jax(grads, jnp.float32).unsafe_buffer_pointer() == grads.data_ptr()
