"""Route 1: interop.convert against torch itself, op by op, and its refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="interop tests need torch (the interop extra)")
from torch import nn  # noqa: E402

import interop  # noqa: E402

torch.manual_seed(0)


class Attention(nn.Module):
    def __init__(self, causal=False):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.causal = causal

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return nn.functional.scaled_dot_product_attention(q, k, v, is_causal=self.causal)


def _bn(cls, c):
    bn = cls(c)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    return bn


class Tokens(nn.Module):
    """Embedding -> LayerNorm -> GELU MLP -> mean -> Linear, with dropout."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.norm = nn.LayerNorm(8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.3), nn.Linear(16, 8))
        self.attn = Attention()
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        x = self.norm(self.embed(tokens))
        x = x + self.mlp(x)
        x = x + self.attn(x)
        return self.head(x.mean(1))


CASES = {
    "Linear": (lambda: nn.Linear(5, 3), (4, 5)),
    "Conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1, stride=2), (4, 3, 10)),
    "Conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1, stride=2), (4, 3, 8, 8)),
    "Conv2d_groups_dilation": (lambda: nn.Conv2d(4, 4, 3, dilation=2, groups=2), (2, 4, 9, 9)),
    "BatchNorm1d": (lambda: _bn(nn.BatchNorm1d, 5), (4, 5)),
    "BatchNorm2d": (lambda: _bn(nn.BatchNorm2d, 3), (4, 3, 8, 8)),
    "LayerNorm": (lambda: nn.LayerNorm(8), (4, 6, 8)),
    "ReLU": (lambda: nn.ReLU(), (4, 5)),
    "GELU": (lambda: nn.GELU(), (4, 5)),
    "GELU_tanh": (lambda: nn.GELU(approximate="tanh"), (4, 5)),
    "MaxPool1d": (lambda: nn.MaxPool1d(2), (4, 3, 10)),
    "MaxPool2d": (lambda: nn.MaxPool2d(3, stride=2, padding=1), (4, 3, 8, 8)),
    "AvgPool2d": (lambda: nn.AvgPool2d(2), (4, 3, 8, 8)),
    "AdaptiveAvgPool2d": (lambda: nn.AdaptiveAvgPool2d((2, 1)), (4, 3, 8, 8)),
    "Dropout": (lambda: nn.Dropout(0.5), (4, 5)),
    "scaled_dot_product_attention": (lambda: Attention(), (4, 6, 8)),
    "scaled_dot_product_attention_causal": (lambda: Attention(causal=True), (4, 6, 8)),
    "Sequential_flatten": (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(),
                                                 nn.Linear(72, 3)), (4, 1, 8, 8)),
}


def run_both(module, x):
    module.eval()
    apply = interop.convert(module)
    state = module.state_dict()
    params = {n: jnp.asarray(state[n].numpy()) for n, _ in module.named_parameters()}
    buffers = {n: jnp.asarray(b.numpy()) for n, b in module.named_buffers()
               if b.is_floating_point()}
    got = np.asarray(jax.jit(apply)(params, buffers, jnp.asarray(x.numpy())))
    with torch.no_grad():
        want = module(x).numpy()
    return got, want


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_matches_torch(name):
    make, shape = CASES[name]
    got, want = run_both(make(), torch.randn(*shape))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_embedding_layer_norm_attention_block_and_its_gradient():
    """Values and parameter gradients of a small token model, converted vs torch."""
    module = Tokens().eval()
    tokens = torch.randint(0, 20, (4, 7))
    got, want = run_both(module, tokens)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    apply = interop.convert(module)
    params = {n: jnp.asarray(p.detach().numpy()) for n, p in module.named_parameters()}
    grads = jax.grad(lambda p: apply(p, {}, jnp.asarray(tokens.numpy())).sum())(params)
    module.zero_grad()
    module(tokens).sum().backward()
    for name, p in module.named_parameters():
        np.testing.assert_allclose(np.asarray(grads[name]), p.grad.numpy(), rtol=1e-4,
                                   atol=1e-5, err_msg=name)


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 4, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0]


class UnsupportedFunction(nn.Module):
    def forward(self, x):
        return torch.cumsum(x, dim=1)


class DataDependent(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


@pytest.mark.parametrize("module, op", [(Unsupported(), "torch.nn.modules.rnn.GRU"),
                                        (UnsupportedFunction(), "cumsum"),
                                        (DataDependent(), "could not trace")])
def test_unsupported_op_names_it_and_suggests_torch_backend(module, op):
    with pytest.raises(interop.UnsupportedOpError, match=op) as info:
        interop.convert(module)
    assert 'backend="torch"' in str(info.value)


def test_batch_norm_without_running_stats_is_refused():
    with pytest.raises(interop.UnsupportedOpError, match="track_running_stats"):
        apply = interop.convert(nn.BatchNorm1d(3, track_running_stats=False).eval())
        apply({}, {}, jnp.ones((2, 3)))


def test_converted_function_is_traced_once_per_shape():
    import chex

    module = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                           nn.Linear(72, 3)).eval()
    apply = interop.convert(module)
    state = module.state_dict()
    params = {n: jnp.asarray(state[n].numpy()) for n, _ in module.named_parameters()}
    buffers = {n: jnp.asarray(state[n].numpy()) for n in ("1.running_mean", "1.running_var")}
    fn = jax.jit(chex.assert_max_traces(apply, n=1))
    x = jnp.ones((4, 1, 8, 8))
    fn(params, buffers, x)
    fn(jax.tree.map(lambda a: a + 1, params), buffers, x + 1)  # new values, same shapes


class Tied(nn.Module):
    """Embedding and output head share one weight (a tied language-model head)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(12, 6)
        self.head = nn.Linear(6, 12, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(self.embed(tokens).mean(1))


def test_tied_weights_through_torch_model_both_routes():
    import trax_attr

    module = Tied().eval()
    tokens = torch.randint(0, 12, (5, 4))
    labels = torch.randint(0, 12, (5,))
    batch = (tokens.numpy(), labels.numpy().astype(np.int32))
    features = {}
    for backend in ("converted", "torch"):
        model = trax_attr.as_model(module, backend=backend)
        params, _ = model.split(None)
        assert sorted(params) == ["embed.weight"]
        features[backend] = trax_attr.featurize(model, None, batch)
    np.testing.assert_allclose(np.asarray(features["converted"][0]),
                               np.asarray(features["torch"][0]), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(features["converted"][1]),
                               np.asarray(features["torch"][1]), rtol=1e-5)
