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

For large k the same A is computed sharded instead (:mod:`trax_attr.parallel.solve`):
each device holds a block of rows of G, accumulated from every chunk
(:func:`gram_rows`), and block Gauss-Jordan elimination (:func:`pivot_inverse`,
:func:`sweep_rows`) turns it into the matching rows of A in place, in float32 (float64
with ``jax_enable_x64``). Which path runs is :func:`choose_solve`'s documented threshold.
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
           "resolve_lambda", "check_lambda", "blas_threads", "capped_blas", "CONDITION_WARN",
           "AUTO", "SOLVES", "HOST_SOLVE_LIMIT", "host_solve_bytes", "choose_solve",
           "check_solve", "gram_rows", "pivot_inverse", "sweep_rows", "condition_warning",
           "singular_message"]


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


def capped_blas():
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
    with capped_blas():
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
        warnings.warn(singular_message(lambda_reg) + "; using its pseudo-inverse. Set "
                      "lambda_reg > 0 (e.g. 'auto', or 1e-3 × the mean diagonal of XᵀX) or "
                      "featurize more training examples than proj_dim.",
                      IllConditionedWarning, stacklevel=4)  # under capped_blas
        inverse = np.linalg.pinv(reg, hermitian=True)
        inverse = (inverse + inverse.T) / 2
    else:
        condition_warning(float(diag.min()), float(diag.max()), lambda_reg,
                          float(np.trace(gram) / k), stacklevel=5)
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


def singular_message(lambda_reg: float) -> str:
    return f"XᵀX + λI is singular (λ = lambda_reg = {lambda_reg})"


def condition_warning(low: float, high: float, lambda_reg: float, mean_diagonal: float,
                      stacklevel: int = 4) -> None:
    """Warn (:class:`IllConditionedWarning`) when the Cholesky diagonal of XᵀX + λI spans
    ``low .. high``, so that cond ≥ (high / low)² exceeds :data:`CONDITION_WARN`."""
    condition = (high / low) ** 2  # a lower bound on cond(XᵀX + λI)
    if condition > CONDITION_WARN:
        warnings.warn(
            f"XᵀX + λI is ill-conditioned (condition ≥ {condition:.1e} with λ = "
            f"lambda_reg = {lambda_reg}); scores may be dominated by rounding. Raise "
            "lambda_reg (e.g. 'auto', or 1e-3 × the mean diagonal of XᵀX, "
            f"{mean_diagonal:.3g} here) or lower proj_dim.",
            IllConditionedWarning, stacklevel=stacklevel)


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


# --- which path: the float64 host inverse, or the sharded one -----------------------------
SOLVES = ("auto", "host", "sharded")
# Bytes per k² the host path holds at its peak, measured by benchmarks/finalize_memory.py:
# XᵀX in float32 (4), its float64 copy, the regularised copy, the Cholesky factor and the
# inverse (8 each), the float32 inverse (4); devices add their psum'd XᵀX on top.
_HOST_BYTES_PER_ENTRY = 40
# The float64 host inverse (the exact path) runs while its peak stays under 8 GiB, i.e.
# k ≤ 14,654 (k = 8,192: 2.7 GB; 16,384: 10.7 GB; 32,768: 43 GB); above it, the sharded one.
HOST_SOLVE_LIMIT = 8 << 30


def host_solve_bytes(k: int) -> int:
    """Host memory the float64 path needs at its peak for a ``(k, k)`` XᵀX (an estimate)."""
    return _HOST_BYTES_PER_ENTRY * int(k) ** 2


def check_solve(solve) -> str:
    if solve not in SOLVES:
        raise ValueError(f"solve must be one of {SOLVES}, got {solve!r}: 'host' factorises "
                         "XᵀX + λI in float64 on the host (exact; k x k float64 copies in host "
                         "memory), 'sharded' inverts it on the mesh, rows split over every "
                         "device of every process (float32 unless jax_enable_x64), 'auto' "
                         f"picks 'host' while host_solve_bytes(k) ≤ {HOST_SOLVE_LIMIT} bytes.")
    return solve


def choose_solve(solve: str, k: int, xtx_dtype) -> str:
    """``"host"`` or ``"sharded"`` for ``solve`` (``"auto"``: host while
    :func:`host_solve_bytes` ≤ :data:`HOST_SOLVE_LIMIT`).

    xtx_dtype float64 asks for float64 accumulation: the sharded path gives it only with
    ``jax_enable_x64`` (a user's switch), so without it "auto" keeps the host path and
    "sharded" is refused.
    """
    solve = check_solve(solve)
    wide = np.dtype(xtx_dtype) == np.float64
    x64 = bool(jax.config.read("jax_enable_x64"))
    if solve == "sharded" and wide and not x64:
        raise ValueError(
            "solve='sharded' with xtx_dtype=float64 needs float64 on the devices: turn on "
            "jax.config.update('jax_enable_x64', True) in your script, or use "
            "xtx_dtype=np.float32 (the sharded solve then runs in float32), or solve='host'.")
    if solve != "auto":
        return solve
    if wide and not x64:
        return "host"
    return "host" if host_solve_bytes(k) <= HOST_SOLVE_LIMIT else "sharded"


# --- the sharded path's per-shard math ----------------------------------------------------
def gram_rows(acc: jax.Array, full: jax.Array, row0, block: int) -> jax.Array:
    """``acc (r, K)`` + the rows ``row0 + [0, r)`` of fullᵀfull, ``full (c, K)``.

    Computed ``block`` rows at a time and written in place, so that the temporary is
    ``(block, K)``, not another ``(r, K)``.
    """
    full = full.astype(acc.dtype)

    def one(s, acc):
        cols = jax.lax.dynamic_slice_in_dim(full, row0 + s * block, block, axis=1)
        part = jax.lax.dynamic_slice_in_dim(acc, s * block, block, axis=0)
        part = part + jnp.matmul(cols.T, full, precision=_HIGHEST)
        return jax.lax.dynamic_update_slice_in_dim(acc, part, s * block, axis=0)

    return jax.lax.fori_loop(0, acc.shape[0] // block, one, acc)


def pivot_inverse(d: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(D⁻¹ (b, b), diag(L) (b,))`` of a positive definite pivot block D = L Lᵀ.

    Scalar Gauss-Jordan sweeps (b steps of rank-1 updates: plain vector code, where
    ``jnp.linalg.cholesky`` inside ``shard_map`` and ``fori_loop`` becomes a slow
    expansion on some backends). The i-th pivot of the sweep is a Schur complement, L_ii²,
    so diag(L) comes for free: that of the Cholesky factor of the whole matrix, for the
    same condition estimate as :func:`inverse_gram`. A D that is not positive definite has
    a pivot ≤ 0, so a NaN or 0 in diag(L).
    """
    d = (d + d.T) / 2

    def step(i, carry):
        m, pivots = carry
        p = m[i, i]
        col, row = m[:, i], m[i, :]
        m = m - jnp.outer(col, row) / p
        m = m.at[:, i].set(-col / p).at[i, :].set(row / p).at[i, i].set(1 / p)
        return m, pivots.at[i].set(p)

    inv, pivots = jax.lax.fori_loop(0, d.shape[0], step, (d, jnp.zeros(d.shape[:1], d.dtype)))
    return (inv + inv.T) / 2, jnp.sqrt(pivots)


def sweep_rows(local: jax.Array, pivot_rows: jax.Array, pivot_inv: jax.Array, start,
               block: int) -> jax.Array:
    """One block Gauss-Jordan step on a block of rows ``local (r, K)`` of M, in place.

    With pivot columns J = ``start + [0, b)``, R = M[J, :] = ``pivot_rows (b, K)``,
    P = M[J, J]⁻¹ = ``pivot_inv (b, b)`` and C = local[:, J], every row i not in J becomes

        M[i, j] − C[i] P R[j]   (j ∉ J),        −C[i] P   (j ∈ J).

    (Rows in J become P R with R[:, J] = I; the caller overwrites them.) After the steps
    J = 0, b, 2b, ... M is its own inverse (Gauss-Jordan without pivoting: stable for a
    positive definite M, whose pivots are its Schur complements). The columns J are
    written as −C P, not as C − (C P) M[J, J] − C P, which would cancel their digits
    away. Done ``block`` rows at a time, in place.
    """
    b = pivot_rows.shape[0]
    hat = jax.lax.dynamic_update_slice_in_dim(
        pivot_rows, jnp.zeros((b, b), pivot_rows.dtype), start, axis=1)

    def one(s, local):
        rows = jax.lax.dynamic_slice_in_dim(local, s * block, block, axis=0)
        cp = jnp.matmul(jax.lax.dynamic_slice_in_dim(rows, start, b, axis=1), pivot_inv,
                        precision=_HIGHEST)
        rows = rows - jnp.matmul(cp, hat, precision=_HIGHEST)
        rows = jax.lax.dynamic_update_slice_in_dim(rows, -cp, start, axis=1)
        return jax.lax.dynamic_update_slice_in_dim(local, rows, s * block, axis=0)

    return jax.lax.fori_loop(0, local.shape[0] // block, one, local)
