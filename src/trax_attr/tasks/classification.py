"""Classification tasks: multiclass (images, text) and binary with a single logit.

Every task here uses the TRAK paper's (Park et al. 2023, sections 3 and 5) output for a
classifier trained with cross-entropy L = -log p, p the probability of the true class:

    f(z) = log(p / (1 - p))        Q(z) = -∂L/∂f = 1 - p

since L = log(1 + exp(-f)) as a function of f, whose derivative is -exp(-f)/(1 + exp(-f))
= -(1 - p). For C classes with logits g, f = g_y - logsumexp_{j≠y} g_j; for one logit g
of the positive class, f = g if y = 1 and -g if y = 0 (the signed logit).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .base import ModelOutput, check_labels, classes_of

__all__ = [
    "classification_margin",
    "one_minus_p",
    "ImageClassification",
    "TextClassification",
    "BinaryClassification",
]


def classification_margin(logits: jax.Array, label: jax.Array) -> jax.Array:
    """Margin g_y - logsumexp_{j≠y} g_j of one example, finite for any finite logits.

    Args:
      logits: ``(C,)`` logits of one example.
      label: ``()`` integer class index.
    """
    others = jnp.where(jnp.arange(logits.shape[-1]) == label, -jnp.inf, logits)
    return logits[label] - jax.nn.logsumexp(others)


def one_minus_p(logits: jax.Array, labels: jax.Array, temperature: float = 1.0) -> jax.Array:
    """1 - softmax(g / T)_y for a batch, accurate also when p is within 1e-8 of 1.

    Computed as exp(logsumexp_{j≠y} - logsumexp_j) rather than 1 - p, which would round to
    zero exactly where a confident example's weight matters.

    Args:
      logits: ``(B, C)``; labels: ``(B,)`` integers; temperature: the loss temperature T.
    Returns:
      ``(B,)`` in the dtype of ``logits``.
    """
    scaled = logits / temperature
    is_label = jnp.arange(scaled.shape[-1])[None, :] == labels[:, None]
    others = jnp.where(is_label, -jnp.inf, scaled)
    return jnp.exp(jax.nn.logsumexp(others, axis=-1) - jax.nn.logsumexp(scaled, axis=-1))


def _check_temperature(task) -> None:
    if not task.loss_temperature > 0:
        raise ValueError(
            f"loss_temperature must be a positive number, got {task.loss_temperature!r}; "
            "use 1.0 for the plain cross-entropy."
        )


@dataclasses.dataclass(frozen=True)
class ImageClassification(ModelOutput):
    """Multiclass classification with one input: examples are ``(image, label)``.

    f(z) = log(p / (1 - p)) = g_y - logsumexp_{j≠y} g_j, the multiclass analogue of the
    logit; Q(z) = -∂L/∂f = 1 - softmax(g / T)_y for the cross-entropy L = -log p.

    ``apply_fn(params, images (B, ...)) -> (B, C)`` logits.

    Attributes:
      loss_temperature: T in the softmax of the out-to-loss term (traker's default is 1).
    """

    loss_temperature: float = 1.0

    def __post_init__(self):
        _check_temperature(self)

    def get_output(self, apply_fn, params, image, label):
        logits = apply_fn(params, image[None])[0]
        return classification_margin(logits, label)

    def get_out_to_loss_grad(self, apply_fn, params, batch):
        images, labels = batch
        logits = apply_fn(params, images)
        return one_minus_p(logits, labels, self.loss_temperature)

    def check_batch(self, batch, rows, output_shape):
        super().check_batch(batch, rows, output_shape)
        check_labels(self, batch[-1], rows, classes_of(output_shape, *(a[:1] for a in batch[:-1])))


@dataclasses.dataclass(frozen=True)
class TextClassification(ModelOutput):
    """Sequence classification (BERT-style): examples ``(input_ids, attention_mask, label)``
    or ``(input_ids, attention_mask, token_type_ids, label)``.

    The output and out-to-loss term are those of :class:`ImageClassification` applied to
    the logits of ``apply_fn(params, input_ids (B, T) int, attention_mask (B, T) int[,
    token_type_ids (B, T) int]) -> (B, C)``: HuggingFace's order
    (``BertForSequenceClassification.forward(input_ids, attention_mask, token_type_ids)``),
    so a HF sequence classifier is used as it is (``TRAKer(model=bert,
    task="text_classification", backend="torch")``; HF models are called by keyword and
    their ``.logits`` taken, see :mod:`trax_attr.interop.conventions`). Models without
    token types (DistilBERT) take examples of three arrays.

    traker 0.3.2's text task takes ``(input_ids, token_type_ids, attention_mask, label)``
    instead, the argument order of its wrapper modules: reorder such batches.

    Attributes:
      loss_temperature: T in the softmax of the out-to-loss term.
    """

    loss_temperature: float = 1.0

    def __post_init__(self):
        _check_temperature(self)

    def get_output(self, apply_fn, params, input_ids, attention_mask, *token_type_ids_label):
        *token_type_ids, label = token_type_ids_label
        inputs = (input_ids, attention_mask, *token_type_ids)
        logits = apply_fn(params, *(a[None] for a in inputs))[0]
        return classification_margin(logits, label)

    def get_out_to_loss_grad(self, apply_fn, params, batch):
        *inputs, labels = batch
        return one_minus_p(apply_fn(params, *inputs), labels, self.loss_temperature)

    def check_batch(self, batch, rows, output_shape):
        if len(batch) not in (3, 4):
            raise ValueError(
                f"batch holds {len(batch)} arrays, but TextClassification takes (input_ids, "
                "attention_mask, label) or (input_ids, attention_mask, token_type_ids, label) "
                "per example (HuggingFace's order; traker's text batches (input_ids, "
                "token_type_ids, attention_mask, label) must be reordered).")
        check_labels(self, batch[-1], rows, classes_of(output_shape, *(a[:1] for a in batch[:-1])),
                     what="labels (the last array of batch)")


@dataclasses.dataclass(frozen=True)
class BinaryClassification(ModelOutput):
    """Binary classification with ONE logit g (the positive class): examples ``(x, label)``.

    With p = sigmoid(g) for label 1 and 1 - sigmoid(g) = sigmoid(-g) for label 0, the
    paper's output is the signed logit f = ±g = log(p / (1 - p)), and for the logistic loss
    L = log(1 + exp(-f)), Q = -∂L/∂f = 1 - sigmoid(f) = sigmoid(-f).

    ``apply_fn(params, x (B, ...)) -> (B,)`` or ``(B, 1)`` logits; labels are 0 or 1 (int,
    bool or float); any label other than 1 counts as the negative class.
    """

    def get_output(self, apply_fn, params, x, label):
        logit = jnp.reshape(apply_fn(params, x[None]), ())
        return jnp.where(label == 1, logit, -logit)

    def get_out_to_loss_grad(self, apply_fn, params, batch):
        x, labels = batch
        logits = jnp.reshape(apply_fn(params, x), (-1,))
        signed = jnp.where(jnp.reshape(labels, (-1,)) == 1, logits, -logits)
        return jax.nn.sigmoid(-signed)
