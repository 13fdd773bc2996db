"""The settings of a TRAK run that its stored arrays depend on, validated once.

:class:`Settings` is what the store records in ``store.json`` and compares when a store is
reopened: the training set size, the task, the projector (its matrix: kind, width, dtype,
generator), the seed, the parameter selection and the XᵀX dtype. Finalize-time choices
(λ, traker's inverse rescaling) are not settings: one featurized store serves any of them,
and each finalized checkpoint and scored experiment records the ones it used.

The validators here are the one copy of each input check of the package; so are the
keyword arguments TRAKer refuses (traker's, with their replacement) and what the first
checkpoint teaches the store (:func:`learned_config`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np

from .hashing import digest

__all__ = ["Settings", "check_int", "check_model_ids", "check_choice", "describe_task",
           "describe_grad_wrt", "MAX_SEED", "MAX_MODEL_ID", "TRAKER_ARGUMENTS",
           "refuse_unknown", "learned_config"]

MAX_SEED = 2**32 - 1       # jax.random.key folds larger seeds onto these (collisions)
MAX_MODEL_ID = 2**32 - 1   # fold_in takes a uint32


def check_int(name: str, value, *, low: int = 0, high: int | None = None,
              fix: str = "", or_none: str = "") -> int:
    """``value`` as an int if it is an integer (not a bool) in ``[low, high]``.

    ``or_none``: what None means, when None is also allowed (the caller tests it first)."""
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
            or value < low or (high is not None and value > high)):
        kind = {0: "a non-negative integer", 1: "a positive integer"}.get(
            low, f"an integer >= {low}")
        bound = "" if high is None else f" up to {high}"
        alternative = f" or None ({or_none})" if or_none else ""
        raise ValueError(f"{name} must be {kind}{bound}{alternative}, got {value!r}"
                         + (f"; {fix}" if fix else "."))
    return int(value)


def check_choice(name: str, value, choices, fix: str = "") -> Any:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not an option; use one of {list(choices)}"
                         + (f" ({fix})." if fix else "."))
    return value


def describe_task(task) -> str:
    """A description of a task that is stable across processes (no memory addresses)."""
    name = f"{type(task).__module__}.{type(task).__qualname__}"
    if dataclasses.is_dataclass(task):
        fields = ", ".join(f"{f.name}={getattr(task, f.name)!r}" for f in dataclasses.fields(task))
        return f"{name}({fields})"
    return name


def describe_grad_wrt(grad_wrt):
    if grad_wrt is None or isinstance(grad_wrt, str):
        return grad_wrt
    if callable(grad_wrt):
        return f"callable:{getattr(grad_wrt, '__qualname__', repr(grad_wrt))}"
    return list(grad_wrt)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a store's arrays depend on; equal settings, interchangeable arrays.

    Attributes:
      train_set_size: n, the number of training examples.
      task: :func:`describe_task` of the task.
      projector: the projector's ``describe()`` (kind, width, dtype, generator...).
      seed: the projection seed; checkpoint m uses fold_in(key(seed), m).
      grad_wrt: :func:`describe_grad_wrt` of the parameter selection.
      xtx_dtype: accumulation dtype of XᵀX, ``"float32"`` or ``"float64"``.
    """

    train_set_size: int
    task: str
    projector: Any
    seed: int
    grad_wrt: Any
    xtx_dtype: str

    def __post_init__(self):
        check_int("train_set_size", self.train_set_size, low=1, high=2**40,
                  fix="the number of training examples.")
        check_int("seed", self.seed, high=MAX_SEED, fix="e.g. seed=0.")
        check_choice("xtx_dtype", self.xtx_dtype, ("float32", "float64"),
                     "np.float32 or np.float64")

    @classmethod
    def create(cls, *, train_set_size, task, projector, seed, grad_wrt, xtx_dtype
               ) -> "Settings":
        """Settings from TRAKer's arguments (task and projector objects, a numpy dtype)."""
        try:
            dtype = np.dtype(xtx_dtype).name
        except TypeError:
            dtype = repr(xtx_dtype)
        return cls(train_set_size, describe_task(task), projector.describe(), seed,
                   describe_grad_wrt(grad_wrt), dtype)

    def to_config(self) -> dict[str, Any]:
        """The settings as the JSON object stored in ``store.json``."""
        config = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return json.loads(json.dumps(config))

    def digest(self) -> str:
        """A digest of :meth:`to_config`: every checkpoint and experiment records it."""
        return digest(self.to_config())


def finite_float(name: str, value, *, low: float = 0.0, fix: str = "") -> float:
    """``value`` as a float if it is a finite number ≥ ``low`` (not a bool)."""
    if (isinstance(value, bool) or not isinstance(value, (int, float, np.number))
            or not math.isfinite(value) or value < low):
        raise ValueError(f"{name} must be a finite number >= {low}, got {value!r}"
                         + (f"; {fix}" if fix else "."))
    return float(value)


def check_model_ids(model_ids, default) -> list[int]:
    """``model_ids`` (a list of checkpoint ids, or one id) as distinct ints; ``default``
    when None."""
    if model_ids is None:
        return list(default)
    if isinstance(model_ids, (int, np.integer)) and not isinstance(model_ids, bool):
        model_ids = [model_ids]
    if isinstance(model_ids, (str, bytes)) or not hasattr(model_ids, "__iter__"):
        raise TypeError(f"model_ids must be a list of checkpoint ids (or one id), got "
                        f"{type(model_ids).__name__}.")
    model_ids = list(model_ids)
    ids = [check_int("model_id", i, high=MAX_MODEL_ID) for i in model_ids]
    if len(set(ids)) != len(ids):
        raise ValueError(f"model_ids={model_ids} names a checkpoint twice; pass each id once.")
    return ids


# traker 0.3.2's arguments, and what replaces each here
TRAKER_ARGUMENTS = {
    "projector_seed": "seed=...",
    "device": "nothing: JAX places arrays; pick devices with mesh=jax.make_mesh(...)",
    "use_half_precision": "proj_dtype=jnp.bfloat16 (the default) or jnp.float32",
    "load_from_save_dir": "nothing: an existing save_dir is always resumed",
    "logging_level": "logging.getLogger('trax_attr').setLevel(...)",
    "proj_max_batch_size": "nothing: projection blocks are sized automatically",
    "gradient_computer": "grad_wrt=... (gradients are the engine's per-example jax.grad)",
    "saver": "nothing: save_dir is the store (trax_attr.store)",
    "score_computer": "nothing: scores are the engine's; top_k= on finalize_scores",
}


def learned_config(selection, params, projector) -> dict:
    """What the first checkpoint teaches the store: the differentiated parameters, their
    shapes and, where the projector knows it without tracing, the feature width."""
    learned = {"grad_dim": selection.grad_dim, "parameters": list(selection.paths),
               "parameter_shapes": [list(np.shape(leaf)) for leaf in selection.split(params)[0]]}
    if not projector.needs_layers:
        from .projection import LayerInfo

        learned["feature_dim"] = projector.output_dim(LayerInfo(selection.grad_dim))
    return learned


def refuse_unknown(arguments) -> None:
    """Refuse TRAKer keyword arguments it does not take; traker's get their replacement."""
    for name in arguments:
        if name in TRAKER_ARGUMENTS:
            raise TypeError(f"TRAKer got traker's argument {name}=; here use "
                            f"{TRAKER_ARGUMENTS[name]} (see 'Coming from traker' in the "
                            "README).")
        raise TypeError(f"TRAKer got an unexpected keyword argument {name!r}.")
