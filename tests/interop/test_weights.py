"""Weight transfer between the torch CNN and its nnx and linen twins, both directions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="interop tests need torch (the interop extra)")
from torch import nn  # noqa: E402

from trax_attr import interop  # noqa: E402
from torch_twins import (  # noqa: E402,F401 (fixtures are used by name)
    TorchCNN, digits_images, linen_cnn, nnx_cnn, torch_cnn)


def torch_logits(module, x):
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def x(digits_images):
    return digits_images[0][0][:32]


def test_torch_to_nnx_and_back(torch_cnn, x):
    twin = interop.torch_to_flax(torch_cnn, nnx_cnn())
    np.testing.assert_allclose(np.asarray(twin(jnp.asarray(x))), torch_logits(torch_cnn, x),
                               rtol=1e-5, atol=1e-5)
    back = TorchCNN()
    back.load_state_dict(interop.flax_to_torch(twin, back))
    for name, value in torch_cnn.state_dict().items():
        if name.endswith("num_batches_tracked"):  # Flax keeps no counter: the target's stays
            continue
        np.testing.assert_array_equal(back.state_dict()[name].numpy(), value.numpy(), name)


def test_torch_to_linen_and_back(torch_cnn, x):
    model = linen_cnn()
    variables = model.init(jax.random.key(0), jnp.asarray(x))
    variables = interop.torch_to_flax(torch_cnn, variables)
    np.testing.assert_allclose(np.asarray(model.apply(variables, jnp.asarray(x))),
                               torch_logits(torch_cnn, x), rtol=1e-5, atol=1e-5)
    back = TorchCNN().eval()
    back.load_state_dict(interop.flax_to_torch(variables, back))
    np.testing.assert_allclose(torch_logits(back, x), torch_logits(torch_cnn, x), rtol=1e-6)


def test_nnx_to_torch_from_flax_weights(x):
    """The other direction first: a Flax-initialised model becomes a torch one."""
    twin = nnx_cnn()
    module = TorchCNN().eval()
    module.load_state_dict(interop.flax_to_torch(twin, module))
    np.testing.assert_allclose(torch_logits(module, x), np.asarray(twin(jnp.asarray(x))),
                               rtol=1e-5, atol=1e-5)


def test_layer_norm_embedding_conv1d_twins():
    from flax import nnx

    class T(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(11, 6)
            self.conv = nn.Conv1d(6, 4, 3)
            self.norm = nn.LayerNorm(4)

        def forward(self, tokens):
            return self.norm(self.conv(self.embed(tokens).transpose(1, 2)).transpose(1, 2))

    class F(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(11, 6, rngs=rngs)
            self.conv = nnx.Conv(6, 4, (3,), padding="VALID", rngs=rngs)
            self.norm = nnx.LayerNorm(4, epsilon=1e-5, rngs=rngs)

        def __call__(self, tokens):
            return self.norm(self.conv(self.embed(tokens)))

    module = T().eval()
    with torch.no_grad():
        module.norm.weight.uniform_(0.5, 1.5)
    tokens = np.random.default_rng(0).integers(0, 11, (3, 9))
    twin = interop.torch_to_flax(module, F(nnx.Rngs(0)))
    with torch.no_grad():
        want = module(torch.from_numpy(tokens)).numpy()
    np.testing.assert_allclose(np.asarray(twin(jnp.asarray(tokens))), want, rtol=1e-5,
                               atol=1e-5)
    state = interop.flax_to_torch(twin, module)
    for name, value in module.state_dict().items():
        np.testing.assert_array_equal(state[name].numpy(), value.numpy(), name)


def test_name_mismatch_is_named():
    from flax import nnx

    class Renamed(nnx.Module):
        def __init__(self, rngs):
            self.first = nnx.Linear(3, 2, rngs=rngs)

    with pytest.raises(ValueError, match=r"missing \['lin/kernel', 'lin/bias'\].*first/bias"):
        interop.torch_to_flax(nn.ModuleDict({"lin": nn.Linear(3, 2)}), Renamed(nnx.Rngs(0)))
    # ...and names= maps the torch name to the Flax path
    module = nn.ModuleDict({"lin": nn.Linear(3, 2)})
    twin = interop.torch_to_flax(module, Renamed(nnx.Rngs(0)), names={"lin": "first"})
    np.testing.assert_array_equal(np.asarray(twin.first.kernel[...]),
                                  module["lin"].weight.detach().numpy().T)


def test_shape_mismatch_is_named():
    from flax import nnx

    class Wider(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 5, rngs=rngs)

    with pytest.raises(ValueError, match=r"lin.weight \(2, 3\) becomes \(3, 2\).*lin/kernel "
                                         r"is \(3, 5\)"):
        interop.torch_to_flax(nn.ModuleDict({"lin": nn.Linear(3, 2)}), Wider(nnx.Rngs(0)))


def test_layer_without_a_twin_is_refused():
    from flax import nnx

    with pytest.raises(ValueError, match="GRU"):
        interop.torch_to_flax(nn.ModuleDict({"rnn": nn.GRU(2, 2)}), nnx.Dict())
