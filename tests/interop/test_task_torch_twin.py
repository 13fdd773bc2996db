"""Text classification and causal LM: TRAK scores of the Flax models equal those of
hand-written torch twins with the same weights (identity projector).

The Flax side is trax_attr's functional core (featurize + trak_scores, float32). One set
of torch twins is checked two ways:

* independently of interop: per-example gradients of the same outputs by torch.func (vmap
  of grad of functional_call), out-to-loss terms written in torch, and the scores solved
  in numpy float64;
* through interop: the twin converted to JAX (backend="converted", its torch.fx graph
  interpreted in jnp) and scored by the same functional core, and the torch route
  (backend="torch": the twin run by torch, the JAX task differentiating through it).

Agreement: max |τ_a - τ_b| / max |τ_b| <= 1e-4 for every pair compared.
"""

import functools
import math
from typing import Callable, NamedTuple

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch twins need torch (the interop extra)")
from torch import nn  # noqa: E402

from trax_attr import interop  # noqa: E402
import trax_attr  # noqa: E402
import task_models as tm  # noqa: E402
from flax import nnx  # noqa: E402


class TAttention(nn.Module):
    def __init__(self, dim, heads, causal):
        super().__init__()
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.heads, self.causal = heads, causal

    def forward(self, x, mask):
        # written so torch.fx traces it (the converted route): the chunks are unpacked, not
        # iterated, and the mask's size is one tuple argument
        b, t, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (a.reshape(b, t, self.heads, d // self.heads) for a in (q, k, v))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // self.heads)
        allowed = mask[:, None, None, :].bool()
        if self.causal:
            allowed = allowed & torch.ones((t, t), dtype=torch.bool).tril()
        weights = torch.softmax(torch.where(allowed, scores, torch.tensor(-1e9)), dim=-1)
        return self.out(torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d))


class TBlock(nn.Module):
    def __init__(self, dim, heads, causal):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim, eps=tm.LN_EPS), nn.LayerNorm(dim, eps=tm.LN_EPS)
        self.attn = TAttention(dim, heads, causal)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x, mask):
        x = x + self.attn(self.ln1(x), mask)
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class TEncoderClassifier(nn.Module):
    def __init__(self, vocab=40, max_len=12, dim=16, heads=2, classes=3):
        super().__init__()
        self.tok, self.typ, self.pos = (nn.Embedding(vocab, dim), nn.Embedding(2, dim),
                                        nn.Embedding(max_len, dim))
        self.block = TBlock(dim, heads, causal=False)
        self.ln, self.head = nn.LayerNorm(dim, eps=tm.LN_EPS), nn.Linear(dim, classes)

    def forward(self, input_ids, attention_mask, token_type_ids):
        t = input_ids.shape[1]
        x = self.tok(input_ids) + self.typ(token_type_ids) + self.pos(torch.arange(t))[None]
        return self.head(self.ln(self.block(x, attention_mask))[:, 0])


class TDecoder(nn.Module):
    def __init__(self, vocab=23, max_len=12, dim=16, heads=2):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.block = TBlock(dim, heads, causal=True)
        self.ln, self.head = nn.LayerNorm(dim, eps=tm.LN_EPS), nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask):
        t = input_ids.shape[1]
        x = self.tok(input_ids) + self.pos(torch.arange(t))[None]
        return self.head(self.ln(self.block(x, attention_mask)))


def copy_weights(module: nnx.Module, twin: nn.Module) -> None:
    """nnx names -> torch names; Linear kernels are (in, out) in flax, (out, in) in torch."""
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(module, nnx.Param)))[0]
    state = {}
    for path, value in flat:
        *prefix, leaf = (str(p.key) for p in path)
        value = np.asarray(value)
        name = {"kernel": "weight", "embedding": "weight", "scale": "weight"}.get(leaf, leaf)
        state[".".join(prefix + [name])] = torch.from_numpy(
            value.T.copy() if leaf == "kernel" else value.copy())
    missing = set(twin.state_dict()) ^ set(state)
    assert not missing, missing
    twin.load_state_dict(state)


def torch_margin(logits, label):
    is_label = torch.arange(logits.shape[-1]) == label
    others = torch.where(is_label, torch.tensor(-torch.inf), logits)
    return (logits * is_label).sum(-1) - torch.logsumexp(others, dim=-1)


def torch_features(twin, output, batch):
    """(B, d) per-example gradients / √d by torch.func, float64 numpy."""
    params = {k: v.detach() for k, v in twin.named_parameters()}

    def one(p, *example):
        return output(lambda *x: torch.func.functional_call(twin, p, x), *example)

    grads = torch.func.vmap(torch.func.grad(one), in_dims=(None,) + (0,) * len(batch))(
        params, *batch)
    g = torch.cat([g.reshape(len(batch[0]), -1) for g in grads.values()], dim=1)
    return g.double().numpy() / math.sqrt(g.shape[1])


def numpy_scores(phi, q, phi_targets, lambda_reg):
    """Φ(ΦᵀΦ + λI)⁻¹φᵀ in its kernel form (ΦΦᵀ + λI)⁻¹Φφᵀ: n x n, not d x d, in float64."""
    kernel = phi @ phi.T + lambda_reg * np.eye(len(phi))
    return np.linalg.solve(kernel, phi @ phi_targets.T) * q[:, None]


def text_output(model, ids, mask, types, label):
    return torch_margin(model(ids[None], mask[None], types[None])[0], label)


def text_q(model, batch):
    ids, mask, types, labels = batch
    p = torch.softmax(model(ids, mask, types), -1)[torch.arange(len(labels)), labels]
    return 1 - p


def lm_output(model, ids, mask, loss_mask):
    logits = model(ids[None], mask[None])[0, :-1]
    w = mask[:-1] * mask[1:] * loss_mask[1:]
    margins = torch.stack([torch_margin(logits[t], ids[t + 1]) for t in range(len(w))])
    return (w * margins).sum()


def lm_q(model, batch):
    ids, mask, loss_mask = batch
    logits = model(ids, mask)[:, :-1]
    p = torch.softmax(logits, -1).gather(-1, ids[:, 1:, None].long())[..., 0]
    w = (mask[:, :-1] * mask[:, 1:] * loss_mask[:, 1:]).to(p.dtype)
    return (w * (1 - p)).sum(-1) / w.sum(-1).clamp(min=1)


class Case(NamedTuple):
    """A Flax model, its torch twin, data, and the task's output and 1 - p in torch."""

    flax: Callable[[], nnx.Module]
    twin: Callable[[], nn.Module]
    train: tuple
    target: tuple
    output: Callable  # output(model, *example) -> () for ONE example
    q: Callable       # q(model, batch) -> (B,)


CASES = {
    "text_classification": Case(  # d = 915
        lambda: tm.build(tm.EncoderClassifier, 0, vocab=20, dim=8),
        lambda: TEncoderClassifier(vocab=20, dim=8),
        tm.text_batch(1, 32, vocab=20), tm.text_batch(2, 6, vocab=20), text_output, text_q),
    "causal_lm": Case(  # d = 933
        lambda: tm.build(tm.Decoder, 1, vocab=13, dim=8),
        lambda: TDecoder(vocab=13, dim=8),
        tm.lm_batch(1, 32, vocab=13, with_loss_mask=True),
        tm.lm_batch(2, 6, vocab=13, with_loss_mask=True), lm_output, lm_q),
}


class Flax(NamedTuple):
    module: nnx.Module
    phi: np.ndarray          # (n, d) f32, train features
    q: np.ndarray            # (n,) f32
    phi_targets: np.ndarray  # (m, d) f32
    lambda_reg: float
    scores: np.ndarray       # (n, m) f32


@functools.cache
def flax_side(task: str) -> Flax:
    """The Flax model's identity-projector scores, computed once per test run."""
    case = CASES[task]
    module = case.flax()
    features = jax.jit(lambda batch: trax_attr.featurize(module, None, batch, task=task))
    phi, q = features(case.train)
    phi_t, _ = features(case.target)
    # n < d: XᵀX has rank n, so λ is set against its n nonzero eigenvalues (mean trace / n)
    lambda_reg = 0.1 * float(np.sum(np.asarray(phi, np.float64) ** 2)) / len(phi)
    scores = trax_attr.trak_scores(phi[None], q[None], phi_t[None], lambda_reg)
    return Flax(module, *(np.asarray(a) for a in (phi, q, phi_t)), lambda_reg,
                np.asarray(scores))


def twin_of(task: str) -> nn.Module:
    twin = CASES[task].twin()
    copy_weights(flax_side(task).module, twin)
    return twin.eval()


def rel_diff(got, want) -> float:
    """max |got - want| / max |want|."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("task", sorted(CASES))
def test_scores_match_torch_func_twin(task):
    """Flax vs the twin differentiated by torch.func, solved in numpy: no interop code."""
    case, flax = CASES[task], flax_side(task)
    twin = twin_of(task)
    to_torch = lambda batch: tuple(torch.from_numpy(np.asarray(a)) for a in batch)
    t_train, t_target = to_torch(case.train), to_torch(case.target)
    t_phi = torch_features(twin, case.output, t_train)
    t_phi_targets = torch_features(twin, case.output, t_target)
    with torch.no_grad():
        t_q = case.q(twin, t_train).double().numpy()
    np.testing.assert_allclose(flax.q, t_q, rtol=1e-5, atol=1e-7)
    # the features agree up to the order of coordinates, which their Gram matrices ignore
    gram = flax.phi.astype(np.float64) @ flax.phi_targets.astype(np.float64).T
    np.testing.assert_allclose(gram, t_phi @ t_phi_targets.T, rtol=1e-4,
                               atol=1e-5 * np.abs(gram).max())
    expected = numpy_scores(t_phi, t_q, t_phi_targets, flax.lambda_reg)
    rel = rel_diff(flax.scores, expected)
    print(f"{task}: d = {flax.phi.shape[1]}, max |flax - torch.func| / max |torch.func| = "
          f"{rel:.2e}")
    assert rel <= 1e-4, rel


@pytest.mark.parametrize("task", sorted(CASES))
def test_scores_match_converted_twin(task):
    """Flax vs the twin converted by interop (backend="converted"), both scored by the
    functional core; the torch route (backend="torch": the twin run by torch, the JAX task
    differentiating through it) on the same twin too."""
    case, flax = CASES[task], flax_side(task)
    twin = twin_of(task)
    converted = trax_attr.as_model(twin, backend="converted")
    features = jax.jit(lambda batch: trax_attr.featurize(converted, None, batch, task=task))
    phi, q = features(case.train)
    phi_t, _ = features(case.target)
    np.testing.assert_allclose(q, flax.q, rtol=1e-5, atol=1e-7)
    scores = np.asarray(trax_attr.trak_scores(phi[None], q[None], phi_t[None], flax.lambda_reg))
    rel = rel_diff(scores, flax.scores)
    print(f"{task}: d = {phi.shape[1]}, max |converted - flax| / max |flax| = {rel:.2e}")
    assert rel <= 1e-4, rel

    # the torch route: the same parameter layout (state_dict names), so the same features
    native = interop.torch_model(twin, "torch")
    phi_n, q_n = trax_attr.featurize(native, None, case.train, task=task)
    phi_tn, _ = trax_attr.featurize(native, None, case.target, task=task)
    np.testing.assert_allclose(phi_n, phi, rtol=1e-4, atol=1e-5 * np.abs(phi).max())
    np.testing.assert_allclose(q_n, q, rtol=1e-5, atol=1e-7)
    scores_n = trax_attr.trak_scores(phi_n[None], q_n[None], phi_tn[None], flax.lambda_reg)
    rel_n = rel_diff(scores_n, scores)
    print(f"{task}: max |torch route - converted| / max |converted| = {rel_n:.2e}")
    assert rel_n <= 1e-4, rel_n
