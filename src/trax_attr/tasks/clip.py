r"""CLIP: attribute an image-text pair's contrastive alignment (TRAK paper, section 5.1.1).

For an image-caption pair with embeddings u = φ(x), v = ψ(y), the output compares the pair
with a comparison set J of n pairs drawn from a bank of embeddings (u_j, v_j):

    f(z) = -log Σ_{j∈J} exp(-(u·v - u·v_j)) - log Σ_{j∈J} exp(-(u·v - u_j·v))
         = (u·v - logsumexp_{j∈J} u·v_j) + (u·v - logsumexp_{j∈J} u_j·v)

the sum of an image-to-text and a text-to-image classification output. The CLIP loss of a
training batch with similarities S = s · U Vᵀ (s the logit scale) is, per example i,
L_i = -log p_i^img - log p_i^txt with p^img = softmax(S, rows)_ii, p^txt = softmax(S,
columns)_ii. Each term is log(1 + exp(-μ)) of its classification margin μ, so with both
margins moving by the same share of f (dμ^img = dμ^txt = df / 2):

    Q(z) = -∂L/∂f = ((1 - p^img) + (1 - p^txt)) / 2 = 1 - (p^img + p^txt) / 2

Sampling. J is drawn uniformly without replacement from all N bank indices (every index,
0 included, can be drawn; traker 0.3.2's multinomial over arange(N) weights index 0 by
zero), with the key fold_in(task.key, index) where ``index`` is the example's integer id
carried in the example. The same example therefore sees the same J on every call: vmap
equals a loop, and a resumed featurize run reproduces its rows.

The bank is computed once, before featurizing, with :func:`clip_embedding_bank`. It holds
embeddings of one checkpoint; with an ensemble, traker recomputes it per checkpoint, which
here means one TRAKer (and store) per checkpoint, or one bank (e.g. of the final model)
for all checkpoints as an approximation.

Q depends on the other examples of the training batch, as in the paper and in traker: the
batch should be a random sample of the training set, not sorted by class or caption.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .base import ModelOutput
from .classification import one_minus_p

__all__ = ["CLIP", "CLIPBank", "clip_embedding_bank"]


class CLIPBank(NamedTuple):
    """Embeddings of N image-caption pairs, the pool the comparison sets are drawn from.

    Attributes:
      image_embeddings: ``(N, D)`` f32, φ(x_j).
      text_embeddings: ``(N, D)`` f32, ψ(y_j).
    """

    image_embeddings: jax.Array
    text_embeddings: jax.Array


def clip_embedding_bank(model, checkpoint, images, texts, *, batch_size: int = 256,
                        dtype=jnp.float32, backend: str | None = None) -> CLIPBank:
    """Embed N image-caption pairs once with one checkpoint: the bank of :class:`CLIP`.

    Args:
      model: anything ``TRAKer(model=...)`` accepts, whose call on ``(images (B, ...),
        texts (B, ...))`` returns ``(image_embeddings (B, D), text_embeddings (B, D))``,
        optionally followed by the logit scale: a JAX or Flax model, an open_clip model
        or a HuggingFace ``CLIPModel`` (torch modules: see ``backend``).
      checkpoint: its weights, as for ``TRAKer.load_checkpoint``.
      images: ``(N, ...)`` images; texts: ``(N, ...)`` captions (e.g. token ids).
      batch_size: pairs embedded per call (the last call is padded, so one compilation).
      dtype: dtype of the returned embeddings.
      backend: for a torch module, as ``TRAKer(backend=...)``: ``"converted"`` (default)
        or ``"torch"`` (embedded by torch); use the TRAKer's.

    Returns:
      :class:`CLIPBank` of ``(N, D)`` arrays in ``dtype``.
    """
    from ..models import as_model

    if len(images) != len(texts):
        raise ValueError(
            f"images and texts must hold the same number of pairs; got {len(images)} images "
            f"and {len(texts)} texts."
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    model = as_model(model, backend=backend)
    params, state = model.split(checkpoint)
    embed = jax.jit(lambda i, t: tuple(model.apply(params, state, i, t)[:2]))
    n = len(images)
    size = min(int(batch_size), n)
    image_parts, text_parts = [], []
    for start in range(0, n, size):
        take = np.minimum(np.arange(start, start + size), n - 1)  # pad with the last pair
        u, v = embed(jnp.asarray(np.asarray(images)[take]), jnp.asarray(np.asarray(texts)[take]))
        keep = min(size, n - start)
        image_parts.append(np.asarray(u[:keep], dtype))
        text_parts.append(np.asarray(v[:keep], dtype))
    return CLIPBank(jnp.asarray(np.concatenate(image_parts)),
                    jnp.asarray(np.concatenate(text_parts)))


@dataclasses.dataclass(frozen=True, eq=False)
class CLIP(ModelOutput):
    """CLIP's contrastive output against a bank: examples ``(image, text, index)``.

    ``apply_fn(params, images (B, ...), texts (B, ...)) -> (image_embeddings (B, D),
    text_embeddings (B, D)[, logit_scale ()])``. ``index`` is the example's integer id
    (its row in the training or target set), which seeds its comparison set. The module
    docstring gives f and Q.

    Attributes:
      bank: a :class:`CLIPBank` from :func:`clip_embedding_bank`.
      key: a typed key (``jax.random.key(seed)``) for the comparison sets.
      num_compare: n, the size of each comparison set (traker's ``sim_batch_size``),
        1 ≤ n ≤ N.
      logit_scale: s multiplying the similarities in the out-to-loss softmax; None uses
        the model's third output (CLIP's learned ``logit_scale.exp()``).

    Equality is identity (the bank is an array), so two CLIP values with the same bank
    still compile separately; ``repr`` shows a digest of the bank for the store.
    """

    bank: CLIPBank
    key: jax.Array
    num_compare: int = 32
    logit_scale: float | None = None

    def __post_init__(self):
        if not isinstance(self.bank, CLIPBank):
            raise TypeError(
                f"bank must be a trax_attr.CLIPBank, got {type(self.bank).__name__}; build it "
                "with trax_attr.clip_embedding_bank(model, checkpoint, images, texts)."
            )
        u, v = self.bank
        if u.ndim != 2 or u.shape != v.shape:
            raise ValueError(
                f"bank embeddings must both be (N, D); got image_embeddings {u.shape} and "
                f"text_embeddings {v.shape}."
            )
        if not (isinstance(self.key, jax.Array)
                and jnp.issubdtype(self.key.dtype, jax.dtypes.prng_key) and self.key.shape == ()):
            raise TypeError(
                f"key must be one typed key such as jax.random.key(0); got "
                f"{getattr(self.key, 'dtype', type(self.key).__name__)} of shape "
                f"{getattr(self.key, 'shape', None)}. Raw uint32 keys: wrap them with "
                "jax.random.wrap_key_data."
            )
        n = u.shape[0]
        if isinstance(self.num_compare, bool) or not isinstance(self.num_compare, (int, np.integer)) \
                or not 1 <= self.num_compare <= n:
            raise ValueError(
                f"num_compare must be an integer in [1, N = {n}] (the bank size); got "
                f"{self.num_compare!r}. Lower it or embed more pairs into the bank."
            )
        if self.logit_scale is not None and not self.logit_scale > 0:
            raise ValueError(f"logit_scale must be a positive number or None (the model's), "
                             f"got {self.logit_scale!r}.")

    def __repr__(self):
        digest = hashlib.blake2b(digest_size=8)
        for array in self.bank:
            digest.update(np.ascontiguousarray(np.asarray(array)).tobytes())
        return (f"CLIP(bank=<{self.bank.image_embeddings.shape[0]}x"
                f"{self.bank.image_embeddings.shape[1]} {digest.hexdigest()}>, "
                f"key={np.asarray(jax.random.key_data(self.key)).tolist()}, "
                f"num_compare={self.num_compare}, logit_scale={self.logit_scale})")

    def comparison_set(self, index: jax.Array) -> jax.Array:
        """``(num_compare,)`` int32 bank indices of example ``index``, uniform, distinct."""
        key = jax.random.fold_in(self.key, index)
        n = self.bank.image_embeddings.shape[0]
        return jax.random.choice(key, n, (self.num_compare,), replace=False)

    def get_output(self, apply_fn, params, image, text, index):
        out = apply_fn(params, image[None], text[None])
        u, v = out[0][0], out[1][0]                                       # (D,), (D,)
        chosen = self.comparison_set(index)
        image_bank = self.bank.image_embeddings[chosen].astype(u.dtype)   # (n, D)
        text_bank = self.bank.text_embeddings[chosen].astype(v.dtype)
        match = jnp.dot(u, v)
        return (2 * match - jax.nn.logsumexp(text_bank @ u)
                - jax.nn.logsumexp(image_bank @ v))

    def get_out_to_loss_grad(self, apply_fn, params, batch):
        images, texts = batch[0], batch[1]
        out = apply_fn(params, images, texts)
        u, v = out[0], out[1]
        if self.logit_scale is not None:
            scale = self.logit_scale
        elif len(out) > 2:
            scale = jnp.ravel(out[2])[0]
        else:
            raise ValueError(
                "logit_scale=None takes the scale from the model's third output, but the "
                f"model returned {len(out)} outputs. Pass CLIP(..., logit_scale=s), or return "
                "(image_embeddings, text_embeddings, logit_scale) from the model."
            )
        sims = scale * (u @ v.T)                                          # (B, B)
        diagonal = jnp.arange(sims.shape[0])
        return (one_minus_p(sims, diagonal) + one_minus_p(sims.T, diagonal)) / 2
