"""Text classification and causal LM: TRAK scores of the Flax models equal those of
hand-written torch twins with the same weights (identity projector).

The JAX side is trax_attr's functional core (featurize + trak_scores, float32). The torch
side is independent: per-example gradients of the same outputs by torch.func (vmap of grad
of functional_call), out-to-loss terms written in torch, and the scores solved in numpy
float64. Agreement: max |τ_jax - τ_torch| / max |τ_torch| <= 1e-4.
"""

import math

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch twins need torch (the interop extra)")
from torch import nn  # noqa: E402

import trax_attr  # noqa: E402
import task_models as tm  # noqa: E402
from flax import nnx  # noqa: E402


class TAttention(nn.Module):
    def __init__(self, dim, heads, causal):
        super().__init__()
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.heads, self.causal = heads, causal

    def forward(self, x, mask):
        b, t, d = x.shape
        q, k, v = (a.reshape(b, t, self.heads, d // self.heads)
                   for a in self.qkv(x).chunk(3, dim=-1))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // self.heads)
        allowed = mask[:, None, None, :].bool()
        if self.causal:
            allowed = allowed & torch.ones(t, t, dtype=torch.bool).tril()
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

    def forward(self, input_ids, token_type_ids, attention_mask):
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


def compare(module, twin, task, train, target, torch_output, torch_q):
    copy_weights(module, twin)
    features = jax.jit(lambda batch: trax_attr.featurize(module, None, batch, task=task))
    phi, q = features(train)
    phi_t, _ = features(target)
    # n < d: XᵀX has rank n, so λ is set against its n nonzero eigenvalues (mean trace / n)
    lambda_reg = 0.1 * float(np.sum(np.asarray(phi, np.float64) ** 2)) / len(phi)
    jax_scores = np.asarray(trax_attr.trak_scores(phi[None], q[None], phi_t[None], lambda_reg))

    to_torch = lambda batch: tuple(torch.from_numpy(np.asarray(a)) for a in batch)
    t_train, t_target = to_torch(train), to_torch(target)
    t_phi = torch_features(twin, torch_output, t_train)
    t_phi_targets = torch_features(twin, torch_output, t_target)
    with torch.no_grad():
        t_q = torch_q(twin, t_train).double().numpy()
    np.testing.assert_allclose(q, t_q, rtol=1e-5, atol=1e-7)
    # the features agree up to the order of coordinates, which their Gram matrices ignore
    gram = np.asarray(phi, np.float64) @ np.asarray(phi_t, np.float64).T
    np.testing.assert_allclose(gram, t_phi @ t_phi_targets.T, rtol=1e-4,
                               atol=1e-5 * np.abs(gram).max())
    expected = numpy_scores(t_phi, t_q, t_phi_targets, lambda_reg)
    rel = np.abs(jax_scores - expected).max() / np.abs(expected).max()
    print(f"{task}: d = {phi.shape[1]}, max |jax - torch| / max |torch| = {rel:.2e}")
    assert rel <= 1e-4, rel


def test_text_classification_scores_match_torch_twin():
    module = tm.build(tm.EncoderClassifier, 0, vocab=20, dim=8)  # d = 915
    twin = TEncoderClassifier(vocab=20, dim=8)

    def output(model, ids, types, mask, label):
        return torch_margin(model(ids[None], types[None], mask[None])[0], label)

    def q(model, batch):
        ids, types, mask, labels = batch
        p = torch.softmax(model(ids, types, mask), -1)[torch.arange(len(labels)), labels]
        return 1 - p

    compare(module, twin, "text_classification", tm.text_batch(1, 32, vocab=20),
            tm.text_batch(2, 6, vocab=20), output, q)


def test_causal_lm_scores_match_torch_twin():
    module = tm.build(tm.Decoder, 1, vocab=13, dim=8)  # d = 933
    twin = TDecoder(vocab=13, dim=8)

    def output(model, ids, mask, loss_mask):
        logits = model(ids[None], mask[None])[0, :-1]
        w = mask[:-1] * mask[1:] * loss_mask[1:]
        margins = torch.stack([torch_margin(logits[t], ids[t + 1]) for t in range(len(w))])
        return (w * margins).sum()

    def q(model, batch):
        ids, mask, loss_mask = batch
        logits = model(ids, mask)[:, :-1]
        p = torch.softmax(logits, -1).gather(-1, ids[:, 1:, None].long())[..., 0]
        w = (mask[:, :-1] * mask[:, 1:] * loss_mask[:, 1:]).to(p.dtype)
        return (w * (1 - p)).sum(-1) / w.sum(-1).clamp(min=1)

    compare(module, twin, "causal_lm", tm.lm_batch(1, 32, vocab=13, with_loss_mask=True),
            tm.lm_batch(2, 6, vocab=13, with_loss_mask=True), output, q)
