"""XᵀX and its regularised inverse: the linear algebra of finalize_features.

For checkpoint m with training features Φ (n, k):

    G = ΦᵀΦ (k, k)        A = (G + λI)⁻¹ (k, k)

G is accumulated chunk by chunk (:func:`gram_block` per chunk of rows, summed in chunk
order in ``dtype``), so the in-memory functional core and the streamed store path add the
same products in the same order. A is factorised on the host in float64 (LAPACK Cholesky
and its symmetric inverse) whatever the device, with the diagnostics that cannot live
inside jit: ill-conditioning warns, a singular matrix falls back to the pseudo-inverse
with a warning. :func:`inverse` is the same host computation as a ``jax.pure_callback``,
so it also runs inside a user's ``jit``.

λ: a number ≥ 0, or ``"auto"`` (the default of TRAKer): :func:`resolve_lambda`.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

__all__ = ["IllConditionedWarning", "gram_block", "inverse_gram", "inverse",
           "resolve_lambda", "check_lambda", "blas_threads", "CONDITION_WARN", "AUTO"]


def blas_threads() -> int:
    """Threads the host BLAS may use for the float64 inverse: half this process's CPUs,
    at least one. A multi-threaded OpenBLAS next to XLA's threads (or other processes)
    spins for cores it does not get: on 2 shared cores under load, k = 2048 took 1.9 s
    with one thread and 8.7 s with two (``docs/speed.md``)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 2
    return max(1, cpus // 2)


def _capped_blas():
    """A context capping the host BLAS at :func:`blas_threads` (threadpoolctl, installed
    with the ``fast`` extra or scikit-learn); without threadpoolctl, no cap (set
    ``OPENBLAS_NUM_THREADS`` yourself)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=blas_threads(), user_api="blas")

AUTO = "auto"
# Above this estimate of cond(XᵀX + λI), float32 features lose most of their digits.
CONDITION_WARN = 1e6
_HIGHEST = jax.lax.Precision.HIGHEST


class IllConditionedWarning(UserWarning):
    """XᵀX + λI is (nearly) singular: the scores are dominated by rounding errors."""


def gram_block(x: jax.Array) -> jax.Array:
    """xᵀx ``(k, k) f32`` of one chunk of rows ``x (c, k) f32`` (the per-chunk kernel)."""
    x = x.astype(jnp.float32)
    return jnp.matmul(x.T, x, precision=_HIGHEST)


def check_lambda(lambda_reg) -> float | str:
    """``lambda_reg`` if it is ``"auto"`` or a finite number ≥ 0, else ValueError."""
    if isinstance(lambda_reg, str):
        if lambda_reg == AUTO:
            return AUTO
    elif (not isinstance(lambda_reg, bool) and isinstance(lambda_reg, (int, float, np.number))
          and math.isfinite(lambda_reg) and lambda_reg >= 0):
        return float(lambda_reg)
    raise ValueError(f"lambda_reg must be a finite number >= 0, got {lambda_reg!r}; or 'auto' "
                     "(chosen from XᵀX, the default). traker's behaviour is 0.0.")


AUTO_SCALE = 0.75


def resolve_lambda(lambda_reg, gram: np.ndarray, n: int) -> float:
    """The λ to add to ``gram (k, k)`` = ΦᵀΦ of ``n`` training rows: ``lambda_reg`` itself,
    or for ``"auto"`` the rule below, which needs no retraining.

    auto: λ = 0.75 · tr(ΦᵀΦ) / n, three quarters of the mean squared norm of a training
    feature row φ(z_i). Φ(ΦᵀΦ + λI)⁻¹ = (K + λI)⁻¹Φ with K = ΦΦᵀ the (n, n) projected
    kernel, so this λ is about one example's self-similarity K_ii: directions of the
    kernel that less than one example supports are shrunk instead of inverted (λ = 0
    amplifies their noise by 1/s). It does not change with the gradients' scale nor with
    proj_dim (K and λ both grow with k). Chosen by experiment (benchmarks/lambda_auto.py,
    docs/lambda.md): on 28 settings (digits MLPs, the demo's CNN, a token-attention model,
    a binary task; k < n and k > n; M = 1 and 10) its LDS was at least 0.97 of the best
    fixed λ of a grid, and above λ = 0 everywhere. Computed per checkpoint.
    """
    lambda_reg = check_lambda(lambda_reg)
    if lambda_reg != AUTO:
        return float(lambda_reg)
    trace = float(np.trace(np.asarray(gram, np.float64)))
    return AUTO_SCALE * trace / int(n) if trace > 0 else 0.0


def inverse_gram(gram: np.ndarray, lambda_reg: float = 0.0, *,
                 traker_inverse_rescale: bool = False) -> np.ndarray:
    """A = (XᵀX + λI)⁻¹ ``(k, k)`` float64, factorised by Cholesky in float64 on the host.

    Warns with :class:`IllConditionedWarning` when the matrix is ill-conditioned; falls
    back to the pseudo-inverse (with a warning) when it is not positive definite, which
    happens with λ = 0 and fewer training rows than k. The host BLAS runs on at most
    :func:`blas_threads` threads meanwhile.

    Args:
      gram: ``(k, k)`` XᵀX (any float dtype).
      lambda_reg: λ ≥ 0, a number (resolve ``"auto"`` first with :func:`resolve_lambda`).
      traker_inverse_rescale: divide A by mean|A| as traker 0.3.2 does.
    """
    with _capped_blas():
        return _inverse_gram(np.asarray(gram, np.float64), lambda_reg, traker_inverse_rescale)


def _inverse_gram(gram: np.ndarray, lambda_reg: float, traker_inverse_rescale: bool):
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
            "Set lambda_reg > 0 (e.g. 'auto', or 1e-3 × the mean diagonal of XᵀX) or "
            "featurize more training examples than proj_dim.", IllConditionedWarning,
            stacklevel=4)
        inverse = np.linalg.pinv(reg, hermitian=True)
        inverse = (inverse + inverse.T) / 2
    else:
        condition = float((diag.max() / diag.min()) ** 2)  # a lower bound on cond(reg)
        if condition > CONDITION_WARN:
            warnings.warn(
                f"XᵀX + λI is ill-conditioned (condition ≥ {condition:.1e} with λ = "
                f"lambda_reg = {lambda_reg}); scores may be dominated by rounding. Raise "
                "lambda_reg (e.g. 'auto', or 1e-3 × the mean diagonal of XᵀX, "
                f"{np.trace(gram) / k:.3g} here) or lower proj_dim.",
                IllConditionedWarning, stacklevel=4)
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


def _host_inverse(gram, n, lambda_reg, traker_inverse_rescale):
    value = resolve_lambda(lambda_reg, gram, n)
    a = inverse_gram(gram, value, traker_inverse_rescale=traker_inverse_rescale)
    return a.astype(np.float32), np.float32(value)


def inverse(gram: jax.Array, n: int, lambda_reg=AUTO, *,
            traker_inverse_rescale: bool = False) -> tuple[jax.Array, jax.Array]:
    """``(A (k, k) f32, λ () f32)``: :func:`inverse_gram` of ``gram`` with λ from
    :func:`resolve_lambda`, computed in float64 on the host; usable inside ``jit``.

    Args:
      gram: ``(k, k) f32`` XᵀX of ``n`` training rows.
      n: the number of training rows (static).
      lambda_reg: ``"auto"`` or a number ≥ 0 (static).
      traker_inverse_rescale: divide A by mean|A| as traker 0.3.2 does.
    """
    lambda_reg = check_lambda(lambda_reg)
    k = gram.shape[0]
    shapes = (jax.ShapeDtypeStruct((k, k), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32))
    return jax.pure_callback(
        lambda g: _host_inverse(np.asarray(g), n, lambda_reg, traker_inverse_rescale),
        shapes, gram, vmap_method="sequential")
