"""Model output functions: what TRAK attributes, and how the loss responds to it.

A task is a small immutable value with two methods, as in the TRAK tutorial for custom
tasks (Park et al. 2023, section 3):

* ``get_output(apply_fn, params, *example) -> ()``: the model output function f(z; θ) of
  ONE example. The library differentiates it with ``jax.grad`` and batches it with
  ``jax.vmap``; write it for a single example and never batch by hand.
* ``get_out_to_loss_grad(apply_fn, params, batch) -> (B,)``: the output-to-loss term
  Q(z) of a batch. Sign convention: Q = -∂L/∂f, which for classification is 1 - p.

``apply_fn(params, *inputs)`` takes BATCHED inputs (a leading batch axis), the way flax
and torch modules are called; a one-example output adds that axis itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "ModelOutput",
    "ImageClassification",
    "TASKS",
    "get_task",
    "out_to_loss_from_loss",
    "classification_margin",
    "one_minus_p",
]

ApplyFn = Callable[..., jax.Array]


class ModelOutput:
    """Base class of a task: subclass it and implement the two methods below.

    Subclasses should be immutable (a frozen dataclass is ideal) so that a task can be a
    static argument of ``jax.jit``: equal tasks then share one compiled function.
    """

    def get_output(self, apply_fn: ApplyFn, params: Any, *example: jax.Array) -> jax.Array:
        """Model output f(z; θ) of ONE example (no batch axis) -> scalar ()."""
        raise NotImplementedError(
            f"{type(self).__name__}.get_output is not implemented: a task must return the "
            "scalar model output of one example, e.g. the classification margin."
        )

    def get_out_to_loss_grad(self, apply_fn: ApplyFn, params: Any, batch: tuple) -> jax.Array:
        """Output-to-loss term Q = -∂L/∂f of a BATCH -> (B,).

        If it cannot be derived by hand, write the loss as a function of the output and
        use :func:`out_to_loss_from_loss`.
        """
        raise NotImplementedError(
            f"{type(self).__name__}.get_out_to_loss_grad is not implemented: return "
            "-dL/df for each example of the batch (1 - p for classification), or derive it "
            "with trax_attr.out_to_loss_from_loss."
        )


def out_to_loss_from_loss(loss_of_output: Callable[..., jax.Array], outputs: jax.Array,
                          *per_example: jax.Array) -> jax.Array:
    """Derive Q = -∂L/∂f by autodiff, for tasks whose derivative is not known by hand.

    Args:
      loss_of_output: ``loss(f, *aux) -> ()``, the training loss of ONE example written
        as a function of its model output ``f`` (a scalar) and any per-example data.
      outputs: ``(B,)`` model outputs of the batch, e.g. ``jax.vmap(task.get_output, ...)``.
      *per_example: arrays with a leading ``B`` axis passed along to ``loss_of_output``.

    Returns:
      ``(B,)`` float array of -dL/df, the sign convention of every built-in task.
    """
    grad = jax.vmap(jax.grad(loss_of_output))(outputs, *per_example)
    return -grad


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


@dataclasses.dataclass(frozen=True)
class ImageClassification(ModelOutput):
    """Multiclass classification with one input: examples are ``(image, label)``.

    f(z) = log(p / (1 - p)) = g_y - logsumexp_{j≠y} g_j, the multiclass analogue of the
    logit; Q(z) = -∂L/∂f = 1 - softmax(g / T)_y for the cross-entropy L = -log p.

    Attributes:
      loss_temperature: T in the softmax of the out-to-loss term (traker's default is 1).
    """

    loss_temperature: float = 1.0

    def __post_init__(self):
        if not self.loss_temperature > 0:
            raise ValueError(
                f"loss_temperature must be a positive number, got {self.loss_temperature!r}; "
                "use 1.0 for the plain cross-entropy."
            )

    def get_output(self, apply_fn, params, image, label):
        logits = apply_fn(params, image[None])[0]
        return classification_margin(logits, label)

    def get_out_to_loss_grad(self, apply_fn, params, batch):
        images, labels = batch
        logits = apply_fn(params, images)
        return one_minus_p(logits, labels, self.loss_temperature)


TASKS: dict[str, type[ModelOutput]] = {
    "image_classification": ImageClassification,
    "classification": ImageClassification,
}


def get_task(task: str | ModelOutput | type[ModelOutput]) -> ModelOutput:
    """Resolve ``task=``: a registered name, a ModelOutput instance, or a subclass of it."""
    if isinstance(task, ModelOutput):
        return task
    if isinstance(task, type) and issubclass(task, ModelOutput):
        return task()
    if isinstance(task, str):
        try:
            return TASKS[task]()
        except KeyError:
            raise ValueError(
                f"task={task!r} is not a registered task; valid names are "
                f"{sorted(TASKS)}, or pass an instance of a trax_attr.ModelOutput subclass."
            ) from None
    raise TypeError(
        f"task must be a task name, a trax_attr.ModelOutput instance or subclass; got "
        f"{type(task).__name__} ({task!r})."
    )
