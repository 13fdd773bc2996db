"""The task interface: a model output f(z; θ) of one example and its out-to-loss term.

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

from collections.abc import Callable
from typing import Any

import jax

__all__ = ["ApplyFn", "ModelOutput", "out_to_loss_from_loss"]

ApplyFn = Callable[..., Any]


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
