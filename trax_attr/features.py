"""Featurize a checkpoint: projected per-example gradients, XᵀX, and the solve.

For checkpoint m with training features Φ (n, k):

    A = (ΦᵀΦ + λI)⁻¹          features  Φ·A  (n, k), stored per checkpoint

Every function here is pure. :func:`featurize_fn` builds the per-batch function that the
TRAKer jits once; :func:`xtx` and :func:`solve` are the jnp math for use inside a user's own
jit; :func:`inverse_gram` is the host-side float64 factorisation the store path uses, with
the diagnostics (ill-conditioning, non-positive-definite) that cannot live inside jit.
"""

from __future__ import annotations

import logging
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from .gradients import GradWrt, Selection, out_to_loss_fn, per_example_grads, select
from .models import Model, as_model
from .projection import Projector, identity, project, projection_key
from .tasks import ModelOutput, get_task

__all__ = ["Featurizer", "featurize_fn", "host_featurize_fn", "featurize", "xtx", "solve",
           "inverse_gram", "IllConditionedWarning"]

logger = logging.getLogger(__name__)


class IllConditionedWarning(UserWarning):
    """XᵀX + λI is (nearly) singular: the scores are dominated by rounding errors."""


class Featurizer(NamedTuple):
    """What is fixed while featurizing with one model, task, selection and projector."""

    task: ModelOutput
    model: Model
    selection: Selection
    projector: Projector


def featurize_fn(f: Featurizer, *, with_out_to_loss: bool = True):
    """Build ``fn(selected, rest, state, key, cache, batch, col_start=0, num_cols=None)
    -> (phi, q)``.

    Args of the returned function:
      selected, rest: the params leaves split by ``f.selection``.
      state: the fixed model state (BatchNorm statistics) or None.
      key: the checkpoint's projection key; cache: its projection cache or None.
      batch: tuple of arrays with a leading batch axis B.
      col_start, num_cols: only these columns of phi (see :func:`project`).

    Returns ``phi (B, k) f32`` and ``q (B,) f32`` (``None`` without out-to-loss). The
    per-example gradients live only inside the function, one leaf at a time.
    """

    def fn(selected, rest, state, key, cache, batch, col_start=0, num_cols=None):
        if f.projector.kind == "kronecker":
            # structured: covered layers are projected from their inputs and output
            # cotangents, so their per-example gradients are never formed
            from .structured import structured_features

            phi = structured_features(f.projector, f.task, f.model, f.selection, selected,
                                      rest, state, key, batch)
        else:
            grads = per_example_grads(f.task, f.model, f.selection, selected, rest, state,
                                      batch)
            phi = project(f.projector, key, grads, cache, col_start=col_start,
                          num_cols=num_cols)
        if not with_out_to_loss:
            return phi, None
        q = out_to_loss_fn(f.task, f.model, f.selection)(selected, rest, state, batch)
        return phi, q.astype(jnp.float32)

    return fn


# one jitted projection for every host-gradient featurizer: its compilations (per
# projector and batch shape) are shared by all TRAKers of the process
_project_jit = jax.jit(project, static_argnums=0)


def host_featurize_fn(f: Featurizer, *, with_out_to_loss: bool = True):
    """:func:`featurize_fn` for a model with ``host_grads`` (gradients outside JAX).

    Same signature and results, but not jittable as a whole: the gradients come from
    ``f.model.host_grads`` on the host; only the projection is jitted (one compilation
    per batch shape). Gradients handed over as jax arrays made with
    ``jax.dlpack.from_dlpack`` (interop's torch route) reach the projection without a copy.
    """

    def fn(selected, rest, state, key, cache, batch):
        params = f.selection.merge(selected, rest)
        grads, q = f.model.host_grads(f.task, params, state, batch, f.selection.paths,
                                      with_out_to_loss)
        if len(grads) != len(f.selection.paths):
            raise ValueError(
                f"{f.model.name}.host_grads returned {len(grads)} gradient arrays for "
                f"{len(f.selection.paths)} selected parameters; it must return one (B, size) "
                "array per path, in the order of the paths it was given."
            )
        phi = _project_jit(f.projector, key, tuple(jnp.asarray(g) for g in grads), cache)
        if not with_out_to_loss:
            return phi, None
        return phi, jnp.asarray(q).reshape(-1).astype(jnp.float32)

    return fn


def featurize(model, checkpoint, batch: tuple, *, task="image_classification",
              projector: Projector | None = None, seed: int = 0, model_id=0,
              grad_wrt: GradWrt = None) -> tuple[jax.Array, jax.Array]:
    """Features of one batch with one checkpoint, as a pure function (jit it freely).

    A torch model with ``backend="torch"`` (``model.host_grads`` set) computes its
    gradients outside JAX: call it outside ``jit`` then.

    Args:
      model: anything ``TRAKer(model=...)`` accepts, or a :class:`Model`.
      checkpoint: its weights, as for ``TRAKer.load_checkpoint``.
      batch: tuple of arrays with a leading batch axis B.
      task, projector, seed, grad_wrt: as for ``TRAKer`` (projector defaults to identity).
      model_id: the checkpoint's id; its projection key is fold_in(key(seed), model_id).

    Returns:
      ``phi (B, k) f32`` projected gradients and ``q (B,) f32`` out-to-loss terms.
    """
    model = as_model(model)
    params, state = model.split(checkpoint)
    selection = select(params, grad_wrt)
    selected, rest = selection.split(params)
    f = Featurizer(get_task(task), model, selection, projector or identity())
    key = projection_key(seed, model_id)
    build = featurize_fn if model.host_grads is None else host_featurize_fn
    return build(f)(selected, rest, state, key, None, tuple(batch))


def xtx(features: jax.Array, dtype=jnp.float32) -> jax.Array:
    """ΦᵀΦ ``(k, k)`` of ``features (n, k)``, accumulated in ``dtype``."""
    x = features.astype(dtype)
    return jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)


def solve(features: jax.Array, gram: jax.Array, lambda_reg: float = 0.0, *,
          traker_inverse_rescale: bool = False) -> jax.Array:
    """Φ·(ΦᵀΦ + λI)⁻¹ ``(n, k)`` by Cholesky, in jnp (usable inside jit).

    Args:
      features: ``(n, k)`` f32 training features Φ.
      gram: ``(k, k)`` ΦᵀΦ, e.g. :func:`xtx`.
      lambda_reg: λ ≥ 0.
      traker_inverse_rescale: divide A by mean|A| as traker 0.3.2 does.
    """
    k = gram.shape[0]
    reg = gram + lambda_reg * jnp.eye(k, dtype=gram.dtype)
    chol = jax.scipy.linalg.cho_factor(reg, lower=True)
    inverse = jax.scipy.linalg.cho_solve(chol, jnp.eye(k, dtype=gram.dtype))
    if traker_inverse_rescale:
        inverse = inverse / jnp.mean(jnp.abs(inverse))
    return jnp.matmul(features, inverse.astype(features.dtype),
                      precision=jax.lax.Precision.HIGHEST)


# Above this estimate of cond(XᵀX + λI), float32 features lose most of their digits.
CONDITION_WARN = 1e6


def inverse_gram(gram: np.ndarray, lambda_reg: float = 0.0, *,
                 traker_inverse_rescale: bool = False) -> np.ndarray:
    """A = (XᵀX + λI)⁻¹ ``(k, k)`` float64, factorised by Cholesky in float64 on the host.

    Warns with :class:`IllConditionedWarning` when the matrix is ill-conditioned; falls
    back to the pseudo-inverse (with a warning) when it is not positive definite, which
    happens with λ = 0 and fewer training rows than k.
    """
    gram = np.asarray(gram, np.float64)
    k = gram.shape[0]
    reg = gram.copy()
    reg[np.diag_indices(k)] += lambda_reg
    # LAPACK potrf/potri: A from the Cholesky factor in k³ flops, the symmetric inverse
    # written to one triangle (two general LU solves would take about 3x as long)
    chol, info = scipy.linalg.lapack.dpotrf(reg, lower=1, clean=1)
    if info != 0:
        chol = None
    diag = np.abs(np.diag(chol)) if chol is not None else None
    if chol is None or diag.min() == 0:
        warnings.warn(
            f"XᵀX + λI is singular (λ = lambda_reg = {lambda_reg}); using its pseudo-inverse. "
            "Set lambda_reg > 0 (e.g. 1e-3 × the mean diagonal of XᵀX) or featurize more "
            "training examples than proj_dim.", IllConditionedWarning, stacklevel=3)
        inverse = np.linalg.pinv(reg, hermitian=True)
        inverse = (inverse + inverse.T) / 2
    else:
        condition = float((diag.max() / diag.min()) ** 2)  # a lower bound on cond(reg)
        if condition > CONDITION_WARN:
            warnings.warn(
                f"XᵀX + λI is ill-conditioned (condition ≥ {condition:.1e} with λ = "
                f"lambda_reg = {lambda_reg}); scores may be dominated by rounding. Raise "
                "lambda_reg (e.g. 1e-3 × the mean diagonal of XᵀX, "
                f"{np.trace(gram) / k:.3g} here) or lower proj_dim.",
                IllConditionedWarning, stacklevel=3)
        # potri overwrites the lower triangle only; the upper one holds the zeros that
        # clean=1 left in the factor, so the full inverse is L + Lᵀ, diagonal counted once
        lower, info = scipy.linalg.lapack.dpotri(chol, lower=1, overwrite_c=1)
        if info != 0:
            raise np.linalg.LinAlgError(f"LAPACK dpotri failed (info={info}) on XᵀX + λI "
                                        f"with λ = lambda_reg = {lambda_reg}; raise lambda_reg.")
        diagonal = lower.diagonal().copy()
        inverse = lower + lower.T
        inverse[np.diag_indices(k)] = diagonal
    if traker_inverse_rescale:
        inverse /= np.abs(inverse).mean()
    return inverse
