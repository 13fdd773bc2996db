"""The Projector protocol: how a checkpoint's per-example gradients become features φ.

Every projector (dense random, identity, Kronecker-structured, or a user's own) is a small
immutable, hashable value (a static argument of ``jax.jit``) with these methods; callers
never test which kind it is.

* ``layer_info(f, checkpoint, example) -> LayerInfo``: what the projector needs to know of
  the model; projectors whose width depends on the model's layers (``needs_layers``)
  trace one example for it, the others need only d.
* ``output_dim(layers: LayerInfo) -> k``: the width of φ.
* ``features(f, checkpoint, batch, *, col_start=0, num_cols=None) -> (B, num_cols) f32``:
  φ of a batch inside ``jit``, for a :class:`~trax_attr.engine.Featurizer` ``f`` (task,
  model, parameter selection, projector) and a :class:`~trax_attr.engine.Checkpoint`.
* ``project(key, grads, cache=None, *, col_start=0, num_cols=None)``: φ from
  per-example gradients given leaf by leaf (models differentiated outside JAX); projectors
  that never form gradients raise :class:`TypeError`.
* ``cache(key, leaf_sizes)``: per-checkpoint data kept between batches, or None.
* ``describe() -> dict``: JSON settings recorded by the store (same dict, same matrix).
* ``splittable``: whether φ's columns can be split over a mesh axis named ``"proj"``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from ..settings import check_int

__all__ = ["Projector", "LayerInfo", "projection_key", "check_positive_int",
           "check_compute_dtype"]


class LayerInfo(NamedTuple):
    """What one traced example tells a projector about the model.

    Attributes:
      grad_dim: d, the number of selected parameters.
      covered: ``{kernel path: (d_in, d_out)}`` of the layers a structured projector
        projects from their inputs and output cotangents (empty for dense projectors).
      fallback_dim: selected parameters no covered layer holds.
    """

    grad_dim: int
    covered: tuple[tuple[str, tuple[int, int]], ...] = ()
    fallback_dim: int = 0


@runtime_checkable
class Projector(Protocol):
    """A projection of per-example gradients to k features (see the module docstring)."""

    @property
    def splittable(self) -> bool: ...

    @property
    def needs_layers(self) -> bool: ...

    def layer_info(self, f, checkpoint, example) -> LayerInfo: ...

    def output_dim(self, layers: LayerInfo) -> int: ...

    def features(self, f, checkpoint, batch, *, col_start=0,
                 num_cols: int | None = None) -> jax.Array: ...

    def project(self, key: jax.Array, grads: tuple[jax.Array, ...], cache: Any = None, *,
                col_start=0, num_cols: int | None = None) -> jax.Array: ...

    def cache(self, key: jax.Array, leaf_sizes: tuple[int, ...]) -> Any: ...

    def describe(self) -> dict[str, Any]: ...


def projection_key(seed: int, model_id: int) -> jax.Array:
    """The key of checkpoint ``model_id``'s matrix: fold_in(key(seed), model_id)."""
    if isinstance(seed, jax.core.Tracer) or isinstance(model_id, jax.core.Tracer):
        return jax.random.fold_in(jax.random.key(seed), model_id)  # inside a user's jit
    if jax.config.jax_default_prng_impl == "threefry2x32":
        # the same key computed on the host: compiling fold_in took 0.2-0.4 s of a fresh
        # process, for 20 rounds of integer arithmetic
        return jax.random.wrap_key_data(
            np.array(_threefry2x32(0, int(np.uint32(seed)), 0, int(np.uint32(model_id))),
                     np.uint32), impl="threefry2x32")
    # one compiled program for any seed and id (eagerly, key and fold_in compile four)
    return _projection_key(np.uint32(seed), np.uint32(model_id))


@jax.jit
def _projection_key(seed, model_id):
    return jax.random.fold_in(jax.random.key(seed), model_id)


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_MASK = 0xFFFFFFFF


def _threefry2x32(k0: int, k1: int, x0: int, x1: int) -> tuple[int, int]:
    """Threefry-2x32 (20 rounds) of the block ``(x0, x1)`` under the key ``(k0, k1)``, as
    jax.random's threefry2x32 primitive. With a 32-bit ``seed``, key(seed) is (0, seed)
    and fold_in(key, data) is this block function of (0, data)."""
    ks = (k0, k1, k0 ^ k1 ^ 0x1BD11BDA)
    x0, x1 = (x0 + ks[0]) & _MASK, (x1 + ks[1]) & _MASK
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = (x0 + x1) & _MASK
            x1 = (((x1 << r) | (x1 >> (32 - r))) & _MASK) ^ x0
        x0 = (x0 + ks[(i + 1) % 3]) & _MASK
        x1 = (x1 + ks[(i + 2) % 3] + i + 1) & _MASK
    return x0, x1


def check_positive_int(name: str, value, fix: str) -> int:
    """``value`` as an int if it is a positive integer (not a bool), else ValueError."""
    return check_int(name, value, low=1, fix=fix)


def check_compute_dtype(dtype) -> str:
    """The name of a projection compute dtype (bfloat16, float16 or float32)."""
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(
            f"dtype={dtype!r} is not a projection compute dtype; use jnp.bfloat16 (fast) or "
            "jnp.float32 (exact)."
        )
    return name


def inverse_sqrt(d: int) -> jax.Array:
    """1/√d as float32: the normalisation of φ = Pᵀ g / √d."""
    return jnp.float32(1.0 / math.sqrt(d))
