"""Tiny models for the task tests, written here so no weights are downloaded.

The transformers are written out (no nnx.MultiHeadAttention) so that a torch twin with the
same parameters is a few lines: tests/interop/test_task_torch_twin.py builds one.
Parameter layout (nnx.Linear kernels are (in, out), torch's weights (out, in)).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LN_EPS = 1e-5  # torch.nn.LayerNorm's default, so the twin matches


class SelfAttention(nnx.Module):
    """Multi-head self-attention over (B, T, D) with a (B, T) padding mask."""

    def __init__(self, dim: int, heads: int, *, causal: bool, rngs: nnx.Rngs):
        self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
        self.out = nnx.Linear(dim, dim, rngs=rngs)
        self.heads = heads
        self.causal = causal

    def __call__(self, x, mask):
        b, t, d = x.shape
        q, k, v = (a.reshape(b, t, self.heads, d // self.heads)
                   for a in jnp.split(self.qkv(x), 3, axis=-1))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // self.heads)
        allowed = mask[:, None, None, :].astype(bool)
        if self.causal:
            allowed = allowed & jnp.tril(jnp.ones((t, t), bool))
        # a large finite negative, not -inf: a fully masked (padding) row stays finite
        weights = jax.nn.softmax(jnp.where(allowed, scores, -1e9), axis=-1)
        return self.out(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d))


class Block(nnx.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, *, causal: bool, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(dim, epsilon=LN_EPS, rngs=rngs)
        self.attn = SelfAttention(dim, heads, causal=causal, rngs=rngs)
        self.ln2 = nnx.LayerNorm(dim, epsilon=LN_EPS, rngs=rngs)
        self.fc1 = nnx.Linear(dim, 2 * dim, rngs=rngs)
        self.fc2 = nnx.Linear(2 * dim, dim, rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.attn(self.ln1(x), mask)
        return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x)), approximate=False))


class EncoderClassifier(nnx.Module):
    """BERT-shaped classifier: (input_ids, attention_mask, token_type_ids) -> (B, C) logits
    (HuggingFace's order)."""

    def __init__(self, vocab=40, max_len=12, dim=16, heads=2, classes=3, *, rngs: nnx.Rngs):
        self.tok = nnx.Embed(vocab, dim, rngs=rngs)
        self.typ = nnx.Embed(2, dim, rngs=rngs)
        self.pos = nnx.Embed(max_len, dim, rngs=rngs)
        self.block = Block(dim, heads, causal=False, rngs=rngs)
        self.ln = nnx.LayerNorm(dim, epsilon=LN_EPS, rngs=rngs)
        self.head = nnx.Linear(dim, classes, rngs=rngs)

    def __call__(self, input_ids, attention_mask, token_type_ids):
        t = input_ids.shape[1]
        x = self.tok(input_ids) + self.typ(token_type_ids) + self.pos(jnp.arange(t))[None]
        x = self.ln(self.block(x, attention_mask))
        return self.head(x[:, 0])  # the first ([CLS]) position


class Decoder(nnx.Module):
    """GPT-shaped decoder: (input_ids, attention_mask) -> (B, T, V) next-token logits."""

    def __init__(self, vocab=23, max_len=12, dim=16, heads=2, *, rngs: nnx.Rngs):
        self.tok = nnx.Embed(vocab, dim, rngs=rngs)
        self.pos = nnx.Embed(max_len, dim, rngs=rngs)
        self.block = Block(dim, heads, causal=True, rngs=rngs)
        self.ln = nnx.LayerNorm(dim, epsilon=LN_EPS, rngs=rngs)
        self.head = nnx.Linear(dim, vocab, rngs=rngs)

    def __call__(self, input_ids, attention_mask):
        t = input_ids.shape[1]
        x = self.tok(input_ids) + self.pos(jnp.arange(t))[None]
        return self.head(self.ln(self.block(x, attention_mask)))


def text_batch(seed: int, n: int, length: int = 8, vocab: int = 40, classes: int = 3):
    """(input_ids, attention_mask, token_type_ids, labels): right-padded, int32."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (n, length)).astype(np.int32)
    lengths = rng.integers(3, length + 1, n)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    types = ((np.arange(length)[None] >= lengths[:, None] // 2) & (mask == 1)).astype(np.int32)
    labels = rng.integers(0, classes, n).astype(np.int32)
    return ids * mask, mask, types, labels


def lm_batch(seed: int, n: int, length: int = 8, vocab: int = 23, with_loss_mask=False):
    """(input_ids, attention_mask[, loss_mask]): right-padded int32; loss_mask hides a prompt."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (n, length)).astype(np.int32)
    lengths = rng.integers(3, length + 1, n)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    if not with_loss_mask:
        return ids * mask, mask
    loss_mask = np.broadcast_to(np.arange(length) >= 2, (n, length)).astype(np.int32)  # prompt
    return ids * mask, mask, loss_mask


def two_tower_init(seed: int, image_dim=12, vocab=30, dim=8):
    """Params of a linear CLIP: images (B, image_dim), texts (B, L) token ids."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {"image": 0.3 * jax.random.normal(k1, (image_dim, dim)),
            "embed": 0.3 * jax.random.normal(k2, (vocab, dim)),
            "text": 0.3 * jax.random.normal(k3, (dim, dim)) + jnp.eye(dim),
            "log_scale": jnp.asarray(np.log(2.0), jnp.float32)}


def two_tower_apply(params, images, texts):
    """-> (image_embeddings (B, D), text_embeddings (B, D), logit_scale ())."""
    u = images @ params["image"]
    v = params["embed"][texts].mean(axis=1) @ params["text"]
    return u, v, jnp.exp(params["log_scale"])


def clip_batch(seed: int, n: int, image_dim=12, length=5, vocab=30):
    """(images (n, image_dim) f32, texts (n, length) int32, index (n,) int32)."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, image_dim)).astype(np.float32),
            rng.integers(0, vocab, (n, length)).astype(np.int32),
            np.arange(seed * 1000, seed * 1000 + n, dtype=np.int32))


def build(cls, seed: int = 0, **kwargs):
    """``cls(**kwargs, rngs=nnx.Rngs(seed))``, initialised in one compiled program (eager
    initialisation compiles every op on its own, several seconds on 2 cores)."""
    return nnx.jit(lambda: cls(**kwargs, rngs=nnx.Rngs(seed)))()
