"""Projections of per-example gradients: the :class:`Projector` protocol and its kinds.

* :mod:`.base`: the protocol, :class:`LayerInfo`, :func:`projection_key`;
* :mod:`.generators`: the entries of P from the key (counter hash, or ``jax.random``);
* :mod:`.dense`: :func:`rademacher`, :func:`normal`, :func:`identity`;
* :mod:`.kronecker`: :func:`kronecker`, per-layer P_in ⊗ P_out without per-example
  gradients.
"""

from __future__ import annotations

import jax

from .base import LayerInfo, Projector, projection_key
from .dense import (DenseProjector, IdentityProjector, identity, normal, rademacher,
                    storage_dtype)
from .generators import GENERATORS
from .kronecker import KroneckerProjector, kronecker

__all__ = ["Projector", "LayerInfo", "DenseProjector", "IdentityProjector",
           "KroneckerProjector", "rademacher", "normal", "identity", "kronecker",
           "get_projector", "projection_key", "project", "projection_cache", "materialize",
           "matrix_block", "storage_dtype", "PROJECTORS", "GENERATORS"]

PROJECTORS = {"rademacher": rademacher, "normal": normal, "identity": identity}


def get_projector(projector, proj_dim: int | None = None, dtype=None) -> Projector:
    """Resolve ``projector=``: a Projector, or a name with ``proj_dim`` (and ``dtype``)."""
    if not isinstance(projector, str):
        if isinstance(projector, Projector):
            return projector
        raise TypeError(
            f"projector must be a name {sorted(PROJECTORS)} or a projector such as "
            f"trax_attr.rademacher(2048); got {type(projector).__name__}. A projector of "
            "your own implements the trax_attr.Projector protocol.")
    if projector not in PROJECTORS:
        raise ValueError(
            f"projector={projector!r} is not known; valid names are {sorted(PROJECTORS)}, or "
            "pass a projector such as trax_attr.rademacher(2048)."
        )
    if projector == "identity":
        return identity()
    kwargs = {} if dtype is None else {"dtype": dtype}
    return PROJECTORS[projector](proj_dim, **kwargs)


def project(projector: Projector, key: jax.Array, grads, cache=None, *, col_start=0,
            num_cols: int | None = None) -> jax.Array:
    """φ = Pᵀ g / √d ``(B, k) f32`` of per-example gradients ``((B, size_l), ...)``; see
    :meth:`DenseProjector.project`."""
    return projector.project(key, tuple(grads), cache, col_start=col_start, num_cols=num_cols)


def projection_cache(projector: Projector, key: jax.Array, leaf_sizes) -> object:
    """What ``projector`` keeps per checkpoint (P split by leaf when it fits its budget),
    or None."""
    return projector.cache(key, tuple(int(s) for s in leaf_sizes))


def materialize(projector, key: jax.Array, grad_dim: int) -> jax.Array:
    """The whole matrix P ``(d, k)`` of a dense or identity projector; tests and small d."""
    return projector.materialize(key, grad_dim)


def matrix_block(projector: DenseProjector, key: jax.Array, row_start, num_rows: int,
                 col_start=0, num_cols: int | None = None) -> jax.Array:
    """Rows ``[row_start, row_start + num_rows)`` of a dense projector's P."""
    return projector.matrix_block(key, row_start, num_rows, col_start, num_cols)
