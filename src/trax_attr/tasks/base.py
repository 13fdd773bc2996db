"""The task interface: a model output f(z; θ) of one example and its out-to-loss term.

A task is a small immutable value with two methods, as in the TRAK tutorial for custom
tasks (Park et al. 2023, section 3):

* ``get_output(apply_fn, params, *example) -> ()``: the model output function f(z; θ) of
  ONE example. The library differentiates it with ``jax.grad`` and batches it with
  ``jax.vmap``; write it for a single example and never batch by hand.
* ``get_out_to_loss_grad(apply_fn, params, batch) -> (B,)``: the output-to-loss term
  Q(z) of a batch. Sign convention: Q = -∂L/∂f, which for classification is 1 - p.
* ``check_batch(batch, rows, output_shape)`` (optional): refuse, on the host, a batch the
  task cannot use (the wrong number of arrays, labels out of range...), naming the example
  and the fix. Inside ``jit`` such a batch would run: JAX clamps out-of-range indices.

``apply_fn(params, *inputs)`` takes BATCHED inputs (a leading batch axis), the way flax
and torch modules are called; a one-example output adds that axis itself.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

__all__ = ["ApplyFn", "ModelOutput", "out_to_loss_from_loss", "check_labels", "arity"]

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

    def check_batch(self, batch: Sequence[np.ndarray], rows: np.ndarray,
                    output_shape: Callable[..., tuple[int, ...]]) -> None:
        """Refuse a batch this task cannot use, with a message naming the fix.

        The base check: the batch holds as many arrays as :meth:`get_output` takes after
        ``(apply_fn, params)``. Tasks with labels or token ids also check their range.

        Args:
          batch: the host arrays of the batch, each with a leading axis B.
          rows: ``(B,)`` the examples' row numbers, for messages.
          output_shape: ``output_shape(*inputs) -> shape`` of the model's output on
            batched inputs (evaluated abstractly, no computation).
        """
        low, high = arity(self.get_output)
        if not low <= len(batch) <= high:
            want = str(low) if low == high else (f"{low} to {high}" if high < 99 else
                                                 f"at least {low}")
            raise ValueError(
                f"batch holds {len(batch)} arrays, but {type(self).__name__}.get_output "
                f"takes {want} per example ({describe_parameters(self.get_output)}); pass "
                "a tuple with one array per example field, e.g. (inputs, labels).")


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


def arity(get_output) -> tuple[int, int]:
    """(least, most) example fields ``get_output(apply_fn, params, *example)`` takes."""
    try:
        params = list(inspect.signature(get_output).parameters.values())[2:]
    except (TypeError, ValueError):
        return 0, 99
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return sum(p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD
                   for p in params), 99
    fields = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return sum(p.default is p.empty for p in fields), len(fields)


def describe_parameters(get_output) -> str:
    try:
        names = list(inspect.signature(get_output).parameters)[2:]
    except (TypeError, ValueError):
        return "any"
    return ", ".join(names)


def check_labels(task, labels: np.ndarray, rows: np.ndarray, classes: int | None,
                 what: str = "labels (the last array of batch)") -> None:
    """Integer class indices ``labels (B,)`` in ``[0, classes)``, or an error naming them.

    Args:
      task: the task, for messages.
      labels: the batch's labels; rows: ``(B,)`` their row numbers.
      classes: C, or None when unknown (only the dtype and shape are checked then).
      what: how the message names the array.
    """
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_:
        raise TypeError(
            f"{what} must be integers for {type(task).__name__}, got dtype {labels.dtype}; "
            "pass class indices, e.g. labels.astype(np.int32) (not one-hot vectors or floats)."
        )
    if labels.ndim != 1:
        raise ValueError(f"{what} must have shape (B,), got {list(labels.shape)}; pass "
                         "class indices, not one-hot vectors.")
    if classes is None:
        return
    bad = (labels < 0) | (labels >= classes)
    if bad.any():
        raise ValueError(
            f"labels {labels[bad][:8].tolist()} of examples {rows[bad][:8].tolist()} "
            f"({int(bad.sum())} in this batch) are outside [0, {classes}), the model's "
            f"{classes} classes; fix those labels (JAX would silently clamp them)."
        )


def classes_of(output_shape, *inputs) -> int | None:
    """C of a classifier from the shape of its output ``(B, C)`` on ``inputs``, or None."""
    try:
        shape = output_shape(*inputs)
    except Exception:  # the model itself will raise a clearer error when it runs
        return None
    return int(shape[-1]) if shape is not None and len(shape) == 2 else None
