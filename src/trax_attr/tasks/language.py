r"""Causal language modelling: attribute a whole sequence's next-token predictions.

Beyond the reference (traker 0.3.2 has no generative-LM task). A sequence z = (x_1..x_T)
is trained with the summed next-token cross-entropy over its target positions

    L(z) = Σ_t w_t ℓ_t,     ℓ_t = -log p_t,     p_t = softmax(g_t)[x_{t+1}]

where g_t (V,) are the logits at position t and w_t ∈ {0, 1} selects the targets:
w_t = a_t · a_{t+1} · m_{t+1} for the attention mask a and an optional loss mask m (0 on
prompt tokens that are context, not targets). Each target is a V-way classification, so
we take the classification output of each token and sum:

    f(z) = Σ_t w_t μ_t,     μ_t = log(p_t / (1 - p_t)) = g_t[x_{t+1}] - logsumexp_{j≠x_{t+1}} g_t[j]

Out-to-loss term. As for classification, ℓ_t = log(1 + exp(-μ_t)), so ∂ℓ_t/∂μ_t = -(1 - p_t).
f is a sum of N = Σ_t w_t margins, so ∂L/∂f needs a direction in which the margins move
when f does; we take the symmetric one, each target's margin moving by the same share,
dμ_t = df / N (the same choice that gives the CLIP term (1 - p_img + 1 - p_txt) / 2):

    Q(z) = -∂L/∂f = -Σ_t w_t (∂ℓ_t/∂μ_t)(dμ_t/df) = (1/N) Σ_t w_t (1 - p_t)

the mean of 1 - p over the targets (0 for a sequence without targets). It is exact when
every target has the same p_t, and for a single target it is the classification term. The
TRAK linearisation this feeds, ∇θL ≈ -Q ∇θf, replaces the exact -Σ_t w_t (1 - p_t) ∇θμ_t
by -mean_t(1 - p_t) Σ_t w_t ∇θμ_t; the error is Σ_t w_t ((1 - p_t) - Q) ∇θμ_t, small when
the model is about as sure of every token of the sequence.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .base import ModelOutput
from .classification import classification_margin, one_minus_p

__all__ = ["CausalLM", "target_weights"]


def target_weights(attention_mask: jax.Array, loss_mask: jax.Array | None = None) -> jax.Array:
    """w_t = a_t · a_{t+1} · m_{t+1}: which next-token predictions count, ``(..., T-1)`` f32.

    Args:
      attention_mask: ``(..., T)`` 0/1 (int or bool); a_t = 1 for real tokens.
      loss_mask: ``(..., T)`` 0/1 or None; 0 marks tokens that are context, not targets.
    """
    a = attention_mask.astype(jnp.float32)
    w = a[..., :-1] * a[..., 1:]
    if loss_mask is not None:
        w = w * loss_mask[..., 1:].astype(jnp.float32)
    return w


@dataclasses.dataclass(frozen=True)
class CausalLM(ModelOutput):
    """Next-token prediction: examples ``(input_ids, attention_mask)`` or with a loss mask.

    f(z) = Σ_t w_t (g_t[x_{t+1}] - logsumexp_{j≠x_{t+1}} g_t[j]) and Q(z) = the mean over
    targets of 1 - p_t; the module docstring derives Q.

    ``apply_fn(params, input_ids (B, T) int, attention_mask (B, T) int) -> (B, T, V)``
    logits, position t predicting token t + 1 (the logits are shifted here, not by the
    model). The optional third element of an example, ``loss_mask (T,)``, zeroes targets
    such as prompt tokens; it is not passed to the model.
    """

    def get_output(self, apply_fn, params, input_ids, attention_mask, loss_mask=None):
        logits = apply_fn(params, input_ids[None], attention_mask[None])[0]      # (T, V)
        margins = jax.vmap(classification_margin)(logits[:-1], input_ids[1:])   # (T-1,)
        return jnp.sum(target_weights(attention_mask, loss_mask) * margins)

    def get_out_to_loss_grad(self, apply_fn, params, batch):
        input_ids, attention_mask, *rest = batch
        loss_mask = rest[0] if rest else None
        logits = apply_fn(params, input_ids, attention_mask)                     # (B, T, V)
        batch_size, length, vocab = logits.shape
        q = one_minus_p(logits[:, :-1].reshape(-1, vocab), input_ids[:, 1:].reshape(-1))
        w = target_weights(attention_mask, loss_mask)
        q = q.reshape(batch_size, length - 1)
        return jnp.sum(w * q, axis=-1) / jnp.maximum(jnp.sum(w, axis=-1), 1.0)

    def check_batch(self, batch, rows, output_shape):
        super().check_batch(batch, rows, output_shape)
        ids = np.asarray(batch[0])
        if not np.issubdtype(ids.dtype, np.integer) or ids.ndim != 2:
            raise TypeError(f"input_ids (the first array of batch) must be integer token ids "
                            f"(B, T), got {ids.dtype}{list(ids.shape)}.")
        try:
            vocab = output_shape(ids[:1], np.asarray(batch[1])[:1])[-1]
        except Exception:  # the model itself will raise a clearer error when it runs
            return
        bad = ((ids < 0) | (ids >= vocab)).any(axis=1)
        if bad.any():
            raise ValueError(
                f"input_ids of examples {rows[bad][:8].tolist()} hold token ids outside "
                f"[0, {vocab}), the model's vocabulary; JAX would silently clamp them. Fix "
                "the tokenisation (or the model's vocabulary size).")
