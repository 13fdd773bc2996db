"""Route 1: interop.convert against torch itself, op by op, and its refusals."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="interop tests need torch (the interop extra)")
from torch import nn  # noqa: E402

from trax_attr import interop  # noqa: E402

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
    "Softmax_implicit_dim": (lambda: nn.Softmax(), (2, 4, 5)),  # torch's legacy dim 0 for 3-D
    "LogSoftmax": (lambda: nn.LogSoftmax(dim=1), (2, 4, 5)),
    "scaled_dot_product_attention": (lambda: Attention(), (4, 6, 8)),
    "scaled_dot_product_attention_causal": (lambda: Attention(causal=True), (4, 6, 8)),
    "Sequential_flatten": (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(),
                                                 nn.Linear(72, 3)), (4, 1, 8, 8)),
}


class Glue(nn.Module):
    """forward(x) = fn(x): one tensor op of attention code, traced by fx through fn."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _attention_mask(x):
    """(B, T, D): causal & padding mask as the task twins build it, applied to x @ xᵀ."""
    b, t, d = x.shape
    scores = torch.einsum("bqd,bkd->bqk", x, x) / math.sqrt(d // 2)
    allowed = (x[:, :, 0] > -1)[:, None, :].bool() & torch.ones((t, t), dtype=torch.bool).tril()
    return torch.softmax(torch.where(allowed, scores, torch.tensor(-1e9)), dim=-1)


def _split_unpacked(x):
    a, b = x.split(2, dim=1)  # fx traces unpacking (not iteration) of a split or chunk
    return a[:, None] * b[None, :, :1]


# x is (2, 4, 5) standard normal; each entry is one new op of the converter (the name says
# which), compared with torch on the same input.
GLUE = {
    "einsum": lambda x: torch.einsum("bij,bkj->bik", x, x),
    "einsum_operand_list": lambda x: torch.einsum("bij->bj", [x]),
    "tril": lambda x: x.tril(),
    "tril_function_diagonal": lambda x: torch.tril(x, -1),
    "triu": lambda x: x.triu(diagonal=1),
    "triu_function": lambda x: torch.triu(x),
    "where_tensor_constant": lambda x: torch.where(x > 0, x, torch.tensor(-1e9)),
    "where_scalar": lambda x: torch.where(x > 0, x, 0.5),
    "where_method": lambda x: x.where(x < 1, -x),
    "masked_fill": lambda x: x.masked_fill(x < 0, -1e4).softmax(-1),
    "masked_fill_function": lambda x: torch.masked_fill(x, x > 1, 0.0),
    "ones_from_shape": lambda x: x + torch.ones((x.shape[1], x.shape[2])),
    "zeros_from_size": lambda x: x + torch.zeros(x.size()),
    "full": lambda x: x * torch.full((x.shape[-1],), 2.5),
    "ones_like_bool": lambda x: torch.ones_like(x, dtype=torch.bool).tril(),
    "zeros_like": lambda x: x + torch.zeros_like(x),
    "full_like": lambda x: x * torch.full_like(x, 3.0),
    "arange": lambda x: x + torch.arange(x.shape[-1]),
    "arange_start_step_dtype": lambda x: torch.arange(1, x.shape[-1] * 2, 2, dtype=torch.float32),
    "arange_float": lambda x: torch.arange(x.shape[-1] * 0.5),
    "bool_float": lambda x: (x > 0).bool().float(),
    "long_int_double": lambda x: (3 * x).long() + (2 * x).int() + x.double(),
    "half": lambda x: x.half().float(),
    "to_dtype": lambda x: (x > 0).to(torch.float32),
    "to_other_tensor": lambda x: (x > 0).to(x),
    "to_dtype_attribute_and_device": lambda x: (2 * x).long().to(x.dtype).to(x.device),
    "type_as": lambda x: (x > 0).type_as(x),
    "and_or_xor_invert": lambda x: (((x > 0) & (x < 1)) | ~(x > -1) ^ (x > 0.5)).float(),
    "comparisons": lambda x: ((x == x.abs()).float() + (x != 0).float() + (x <= 0.2).float()
                              + (x >= -0.2).float()),
    "floordiv_mod_pow": lambda x: x // 0.3 + x % 0.7 + x ** 2,
    "shape_arithmetic": lambda x: x.reshape(x.shape[0], x.shape[1] * x.shape[2] // 2, 2)
    / math.sqrt(x.shape[-1]),
    "dim": lambda x: x.sum(x.dim() - 1),
    "softmax_function_dim": lambda x: torch.softmax(x, dim=1),
    "softmax_implicit_dim": lambda x: nn.functional.softmax(x, _stacklevel=5),
    "softmax_dtype": lambda x: nn.functional.softmax(x, -1, dtype=torch.float32),
    "log_softmax_function": lambda x: torch.log_softmax(x, -1),
    "log_softmax_method": lambda x: x.log_softmax(dim=0),
    "stack": lambda x: torch.stack([x, 2 * x], dim=1),
    "exp_log_sqrt_rsqrt_abs": lambda x: (torch.exp(x) + torch.log(x.abs() + 1)
                                         + torch.sqrt(x.abs()) + torch.rsqrt(x.abs() + 1)),
    "exp_log_sqrt_rsqrt_abs_methods": lambda x: (x.exp() + (x.abs() + 1).log() + x.abs().sqrt()
                                                 + (x.abs() + 1).rsqrt()),
    "split_unpacked_none_and_slices": _split_unpacked,
    "attention_mask": _attention_mask,
}


@pytest.mark.filterwarnings("ignore:Implicit dimension choice for softmax")
@pytest.mark.parametrize("name", sorted(GLUE))
def test_glue_op_matches_torch(name):
    got, want = run_both(Glue(GLUE[name]), torch.randn(2, 4, 5))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


class Constants(nn.Module):
    """A plain tensor attribute and an integer buffer: constants of the converted function."""

    def __init__(self):
        super().__init__()
        self.scale = torch.linspace(0.5, 1.5, 5)
        self.register_buffer("offset", torch.arange(5))

    def forward(self, x):
        return x * self.scale + self.offset + torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])


def test_tensor_constants_and_integer_buffers_leave_the_module_unchanged():
    module = Constants()
    before = dict(vars(module))
    got, want = run_both(module, torch.randn(3, 5))  # the int buffer is not passed to apply
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert vars(module).keys() == before.keys()  # fx's _tensor_constant0 was removed again


class ConstantThenControlFlow(nn.Module):
    def forward(self, x):
        y = x + torch.tensor(1.0)  # fx stores the constant before the branch fails the trace
        return y if y.sum() > 0 else -y


def test_failed_trace_leaves_the_module_unchanged():
    module = ConstantThenControlFlow().train()
    before = set(vars(module))
    apply = interop.convert(module)  # exported when first applied
    with pytest.raises(interop.UnsupportedOpError, match="could not trace"):
        apply({}, {}, jnp.ones((2, 3)))
    assert set(vars(module)) == before and module.training


@pytest.mark.parametrize("fn, op", [(lambda x: torch.where(x > 0), "torch.where"),
                                    (lambda x: x + math.sqrt(x), "could not trace"),
                                    (lambda x: x.to(torch.complex64), "complex64")])
def test_unsupported_glue_is_refused_when_applied(fn, op):
    apply = interop.convert(Glue(fn))
    with pytest.raises(interop.UnsupportedOpError, match=op):
        apply({}, {}, jnp.ones((2, 3)))


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


@pytest.mark.filterwarnings("ignore:Implicit dimension choice for softmax")
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
    """Three ops outside the table, one of them twice, and ops that follow from them."""

    def __init__(self):
        super().__init__()
        self.inner = UnsupportedFunction()

    def forward(self, x):
        return (torch.fft.rfft(x, dim=-1).abs().sum() + torch.special.bessel_j0(x)
                + self.inner(x) + torch.fft.rfft(2 * x, dim=-1).real.sum())


class UnsupportedFunction(nn.Module):
    def forward(self, x):
        return x.cummax(-1)[0]


class DataDependent(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


@pytest.mark.parametrize("module, op", [(UnsupportedFunction(), "cummax"),
                                        (DataDependent(), "could not trace")])
def test_unsupported_op_names_it_and_suggests_torch_backend(module, op):
    with pytest.raises(interop.UnsupportedOpError, match=op) as info:
        interop.convert(module)({}, {}, jnp.ones((2, 3)))
    assert 'backend="torch"' in str(info.value)


def test_every_unsupported_op_is_listed_at_once_with_its_count_and_module():
    with pytest.raises(interop.UnsupportedOpError) as info:
        interop.convert(Unsupported())({}, {}, jnp.ones((2, 3, 4)))
    text = str(info.value)
    assert "3 op(s)" in text
    assert "aten._fft_r2c.default x2" in text
    assert "aten.special_bessel_j0.default x1" in text
    assert "aten.cummax.default x1: not in the op table (first in inner, a " \
           "UnsupportedFunction)" in text


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
