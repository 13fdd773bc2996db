"""Evaluation: the linear datamodeling score (LDS), counterfactual retraining, baselines.

LDS (Park et al. 2023, section 2.2) asks how well attribution scores predict what happens
when the model is retrained on a subset of its training set. For random subsets
S_1..S_s (``masks``, each an alpha-fraction of the training set) and the margins of
models retrained on each (``margins``), the prediction of subset s for target j is the
sum of the scores of the examples it keeps, ``(masks @ scores)[s, j]``; the LDS of target
j is the Spearman rank correlation, over subsets, between predictions and margins; the
LDS is its mean over targets.

Everything here is host-side numpy except the retraining, which trains all models at once
(``jax.vmap`` over models, ``optax``) and is deterministic from its key.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .store import replace_file_atomic

__all__ = [
    "LDSResult",
    "lds",
    "rank_average",
    "spearman_columns",
    "subset_retraining",
    "train_nnx_models",
    "grad_dot_scores",
    "grad_cosine_scores",
    "random_scores",
    "ScoreAgreement",
    "compare_scores",
]

# Bumped whenever the retraining recipe changes, so that old cache files are not reused.
_RETRAIN_VERSION = 1


# --- ranks and correlations ------------------------------------------------------------

def rank_average(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values (s,)``, ties sharing their average rank -> ``(s,) f64``."""
    values = np.asarray(values)
    unique, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    del unique
    last = np.cumsum(counts)
    return (last - (counts - 1) / 2.0)[inverse.reshape(-1)]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denom = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denom if denom > 0 else math.nan


def _spearman(a: np.ndarray, b: np.ndarray, min_rows: int = 3) -> float:
    """Spearman of two vectors over the rows where both are finite; NaN when undefined
    (fewer than ``min_rows`` such rows, or either side constant on them)."""
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < min_rows:
        return math.nan
    a, b = a[ok], b[ok]
    if a.min() == a.max() or b.min() == b.max():
        return math.nan
    return _pearson(rank_average(a), rank_average(b))


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column pair of ``a, b (s, m)`` -> ``(m,) f64``.

    Rows where either value is NaN or infinite are left out of that column's correlation;
    a column that is constant (on its finite rows), or has fewer than 3 finite rows, gets
    NaN because its rank correlation is undefined.
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return np.array([_spearman(a[:, j], b[:, j]) for j in range(a.shape[1])], np.float64)


def _pearson_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    out = np.full(a.shape[1], np.nan)
    for j in range(a.shape[1]):
        ok = np.isfinite(a[:, j]) & np.isfinite(b[:, j])
        if ok.sum() >= 2:
            out[j] = _pearson(a[ok, j], b[ok, j])
    return out


# --- LDS -------------------------------------------------------------------------------

class LDSResult(NamedTuple):
    """Linear datamodeling score with its bootstrap confidence interval.

    Attributes:
      mean: the mean over targets of the per-target Spearman correlations (NaN targets
        left out).
      low, high: bounds of the bootstrap confidence interval of ``mean``, resampling
        targets.
      per_target: ``(n_targets,) f64`` Spearman correlation of each target; NaN where it
        is undefined (see :func:`lds`).
    """

    mean: float
    low: float
    high: float
    per_target: np.ndarray


def _as_2d(name: str, value, dtype=None) -> np.ndarray:
    array = np.asarray(value) if dtype is None else np.asarray(value, dtype)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array, got shape {array.shape}.")
    return array


def lds(scores, masks, margins, *, n_bootstrap: int = 1000, confidence: float = 0.95,
        seed: int = 0) -> LDSResult:
    """Linear datamodeling score of attribution ``scores`` against retrained models.

    Args:
      scores: ``(n_train, n_targets)`` attribution scores τ (any float dtype).
      masks: ``(S, n_train)`` bool, which training examples subset s kept (0/1 integers
        are accepted).
      margins: ``(S, n_targets)`` the output (e.g. margin) of the model retrained on
        subset s, on each target.
      n_bootstrap: resamples of the targets for the confidence interval (>= 1).
      confidence: level of the two-sided percentile interval, in (0, 1).
      seed: seed of the bootstrap resampling.

    Returns:
      :class:`LDSResult`. NaN handling: for each target, subsets whose prediction or
      margin is NaN or infinite (a diverged retraining) are left out; a target whose
      predictions or margins are constant over the remaining subsets, or with fewer than
      3 of them, has an undefined correlation: its ``per_target`` entry is NaN and it is
      excluded from the mean and the bootstrap. If no target is left, every field is NaN
      and a RuntimeWarning says why.
    """
    scores = _as_2d("scores", scores, np.float64)
    masks = _as_2d("masks", masks)
    margins = _as_2d("margins", margins, np.float64)
    if masks.dtype != np.bool_:
        if not (np.issubdtype(masks.dtype, np.integer) and np.isin(masks, (0, 1)).all()):
            raise ValueError(
                f"masks must be a bool array (S, n_train), or 0/1 integers; got "
                f"{masks.dtype} values. Pass masks as returned by subset_retraining."
            )
        masks = masks.astype(bool)
    if masks.shape[1] != scores.shape[0]:
        raise ValueError(
            f"masks has {masks.shape[1]} columns but scores has {scores.shape[0]} rows; both "
            "count training examples (masks (S, n_train), scores (n_train, n_targets))."
        )
    if margins.shape != (masks.shape[0], scores.shape[1]):
        raise ValueError(
            f"margins has shape {margins.shape}, expected (S, n_targets) = "
            f"{(masks.shape[0], scores.shape[1])} from masks {masks.shape} and scores "
            f"{scores.shape}."
        )
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, (int, np.integer)) \
            or n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be a positive integer, got {n_bootstrap!r}.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence!r}.")

    # Non-finite scores of one example would poison every prediction of the subsets that
    # keep it; the product is then non-finite there and those subsets are left out.
    with np.errstate(invalid="ignore", over="ignore"):
        predictions = masks.astype(np.float64) @ scores
    per_target = spearman_columns(predictions, margins)
    valid = per_target[np.isfinite(per_target)]
    if valid.size == 0:
        warnings.warn(
            f"LDS is undefined: none of the {per_target.size} targets has a defined rank "
            "correlation (predictions or margins constant, or too few finite subsets). "
            "Check that the masks differ and that the margins vary.",
            RuntimeWarning, stacklevel=2)
        return LDSResult(math.nan, math.nan, math.nan, per_target)
    means = _bootstrap_means(valid, int(n_bootstrap), seed)
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return LDSResult(float(valid.mean()), float(low), float(high), per_target)


def _bootstrap_means(values: np.ndarray, n_bootstrap: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # chunks bound the (chunk, n) index array for large target sets
    chunk = max(1, (1 << 22) // values.size)
    out = []
    for start in range(0, n_bootstrap, chunk):
        size = min(chunk, n_bootstrap - start)
        out.append(values[rng.integers(0, values.size, (size, values.size))].mean(1))
    return np.concatenate(out)


# --- counterfactual retraining ---------------------------------------------------------

def _check_key(key) -> jax.Array:
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    if isinstance(key, (jax.Array, np.ndarray)) and key.dtype == np.uint32 and key.shape == (2,):
        return jax.random.wrap_key_data(jnp.asarray(key))
    raise TypeError(
        f"key must be a JAX PRNG key, got {type(key).__name__} {key!r}; pass "
        "jax.random.key(0)."
    )


def _check_dataset(name: str, data) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(f"{name} must be a pair (x (n, ...), y (n,) int); got "
                        f"{type(data).__name__}.")
    x, y = np.asarray(data[0]), np.asarray(data[1])
    if x.ndim < 2 or y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"{name} must be (x (n, ...), y (n,) integer labels); got x {x.dtype}{list(x.shape)}"
            f" and y {y.dtype}{list(y.shape)}."
        )
    return x.astype(np.float32), y.astype(np.int32)


class MLP(nnx.Module):
    """The small ReLU MLP that :func:`subset_retraining` trains by default.

    Args:
      sizes: ``(in_features, *hidden, num_classes)``; inputs are flattened first.
      rngs: the ``nnx.Rngs`` of the initialisation.
    """

    def __init__(self, sizes: Sequence[int], rngs: nnx.Rngs):
        # uniform fan-in init: the truncated normal default compiles slowly on CPU
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "uniform")
        self.layers = nnx.List([nnx.Linear(a, b, kernel_init=init, rngs=rngs)
                                for a, b in zip(sizes[:-1], sizes[1:])])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


@dataclasses.dataclass(frozen=True)
class _MLPFactory:
    """``make_model`` of an :class:`MLP`; equal sizes hash equal, so compiles are shared."""

    sizes: tuple[int, ...]

    def __call__(self, rngs):
        return MLP(self.sizes, rngs)


def _subset_indices(key: jax.Array, n: int, size: int, count: int) -> np.ndarray:
    """``(count, size)`` int32 sorted row indices; subset i depends only on fold_in(key, i)."""
    perm = jax.vmap(lambda i: jax.random.permutation(jax.random.fold_in(key, i), n)[:size])
    return np.sort(np.asarray(perm(jnp.arange(count))), axis=1).astype(np.int32)


@functools.partial(jax.jit, static_argnums=0)
def _init_one(make_model, key):
    _, params, rest = nnx.split(make_model(nnx.Rngs(key)), nnx.Param, ...)
    return params, rest


def _train_one(graphdef, steps, lr, batch_size, params, rest, data_key, rows, size, x, y):
    """Adam on minibatches drawn from ``rows[:size]``; rows is padded to a fixed length so
    that subsets of every size share one compiled program."""
    import optax

    optimizer = optax.adam(lr)

    def step(carry, step_key):
        params, rest, opt_state = carry
        pick = rows[jax.random.randint(step_key, (batch_size,), 0, size)]

        def loss_fn(p):
            model = nnx.merge(graphdef, p, rest, copy=True)
            logits = model(x[pick])
            _, _, new_rest = nnx.split(model, nnx.Param, ...)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y[pick]).mean()
            return loss, new_rest

        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), rest, opt_state), loss

    carry = (params, rest, optimizer.init(params))
    (params, rest, _), _ = jax.lax.scan(step, carry, jax.random.split(data_key, steps))
    return params, rest


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _train_many(graphdef, steps, lr, batch_size, params, rest, data_keys, rows, sizes, x, y):
    one = functools.partial(_train_one, graphdef, steps, lr, batch_size)
    return jax.vmap(one, in_axes=(0, 0, 0, 0, 0, None, None))(params, rest, data_keys, rows,
                                                              sizes, x, y)


def _stack(trees):
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _take(tree, index):
    return jax.tree.map(lambda leaf: leaf[index], tree)


def train_nnx_models(key, make_model: Callable[[Any], Any], x, y, subsets, *, steps: int,
                     lr: float, batch_size: int = 128, models_at_once: int | None = None):
    """Train one ``flax.nnx`` model per row of ``subsets``, vectorised over models.

    Model i is initialised from ``fold_in(key, i)`` and trained with Adam on minibatches
    drawn with replacement from its own rows ``subsets[i]``; it depends on nothing else,
    so results do not change (beyond float rounding) with the number of models trained
    together. Non-parameter state (BatchNorm statistics) is updated in train mode.

    Args:
      key: a JAX PRNG key.
      make_model: ``make_model(rngs: nnx.Rngs) -> nnx.Module`` mapping a batch ``(B, ...)``
        to logits ``(B, C)``, in train mode. A class or a module-level function lets
        calls share compiled programs.
      x: ``(n, ...)`` f32 inputs; y: ``(n,)`` int labels.
      subsets: ``(S, size)`` int row indices of each model's training subset.
      steps, lr, batch_size: Adam steps, learning rate and minibatch size.
      models_at_once: how many models one compiled call trains (``jax.vmap`` over them);
        ``None``: all. vmap suits matmul models; convolutions vmapped over models lower
        to grouped convolutions that are slow on CPU, so train CNNs with 1 here.

    Returns:
      ``(graphdef, params, rest)``: params and rest are ``nnx.State`` whose leaves have a
      leading ``S`` axis; ``nnx.merge(graphdef, params_i, rest_i)`` is model i.
    """
    key = _check_key(key)
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.int32)
    subsets = np.asarray(subsets, np.int32)
    count, size = subsets.shape
    # abstract: building a real template would compile every initialiser eagerly
    graphdef, _, _ = nnx.split(nnx.eval_shape(lambda: make_model(nnx.Rngs(0))), nnx.Param, ...)
    # pad every subset to n rows, the first `size` of them used, so that subsets of any
    # size (e.g. the full set and halves) reuse one compiled training program
    rows = np.zeros((count, x.shape[0]), np.int32)
    rows[:, :size] = subsets
    sizes = np.full(count, size, np.int32)
    model_keys = [jax.random.fold_in(key, i) for i in range(count)]
    split = [jax.random.split(k) for k in model_keys]
    # one model at a time: the compiled initialiser is shared by every call
    inits = [_init_one(make_model, pair[0]) for pair in split]
    data_keys = jnp.stack([pair[1] for pair in split])
    chunk = count if models_at_once is None else max(1, min(int(models_at_once), count))
    params_out, rest_out = [], []
    for start in range(0, count, chunk):
        ids = np.arange(start, start + chunk)
        ids = np.where(ids < count, ids, start)  # pad the last chunk: same compiled shape
        params, rest = _train_many(
            graphdef, int(steps), float(lr), int(batch_size),
            _stack([inits[i][0] for i in ids]), _stack([inits[i][1] for i in ids]),
            data_keys[ids], jnp.asarray(rows[ids]), jnp.asarray(sizes[ids]), x, y)
        keep = min(chunk, count - start)
        params_out += [_take(params, j) for j in range(keep)]
        rest_out += [_take(rest, j) for j in range(keep)]
    return graphdef, _stack(params_out), _stack(rest_out)


@functools.partial(jax.jit, static_argnums=0)
def _margins_one(graphdef, params, rest, x, y):
    from .tasks import classification_margin

    model = nnx.merge(graphdef, params, rest, copy=True)
    model.eval()
    return jax.vmap(classification_margin)(model(x), y)


def nnx_margins(graphdef, params, rest, x, y) -> np.ndarray:
    """Classification margins of S stacked nnx models (eval mode) -> ``(S, m) f32``.

    A positive margin means p_y > 1/2: a correct and confident prediction.

    Args:
      graphdef, params, rest: as returned by :func:`train_nnx_models`.
      x: ``(m, ...)`` f32 inputs; y: ``(m,)`` int labels.
    """
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.int32)
    count = jax.tree_util.tree_leaves(params)[0].shape[0]
    # one model per call: one compiled program for any number of models
    return np.stack([np.asarray(_margins_one(graphdef, _take(params, i), _take(rest, i), x, y))
                     for i in range(count)]).astype(np.float32)


def _digest(*parts) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(str((part.dtype.str, part.shape)).encode())
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=repr).encode())
    return h.hexdigest()


def _save_npz_atomic(path: Path, **arrays) -> None:
    replace_file_atomic(path, lambda handle: np.savez(handle, **arrays), binary=True)


def subset_retraining(key, train, targets, *, num_models: int = 256, alpha: float = 0.5,
                      hidden: Sequence[int] = (64,), steps: int = 600, lr: float = 3e-3,
                      batch_size: int = 128, make_model: Callable[[Any], Any] | None = None,
                      models_at_once: int | None = None,
                      cache_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Counterfactual ground truth for :func:`lds`: retrain on random subsets, get margins.

    Trains ``num_models`` small models, each on its own random subset of
    ``round(alpha * n_train)`` training examples, all at once (see
    :func:`train_nnx_models`), and evaluates each on the targets. Deterministic from
    ``key``: subset i and model i depend only on ``fold_in`` of the key with i.

    Args:
      key: a JAX PRNG key, e.g. ``jax.random.key(0)``.
      train: ``(x (n_train, ...) f32, y (n_train,) int)``.
      targets: ``(x (n_targets, ...) f32, y (n_targets,) int)``.
      num_models: S, the number of subsets and retrained models.
      alpha: fraction of the training set in each subset, in (0, 1].
      hidden: hidden widths of the default ReLU MLP.
      steps, lr, batch_size: Adam steps, learning rate and minibatch size per model.
      make_model: optional ``make_model(nnx.Rngs) -> nnx.Module`` (logits, train mode)
        to retrain instead of the MLP, e.g. the architecture whose TRAK scores are being
        evaluated; ``hidden`` is then unused.
      models_at_once: see :func:`train_nnx_models` (use 1 for CNNs on CPU); does not
        change the results beyond float rounding.
      cache_dir: folder of an on-disk cache (npz, no pickle) keyed by a digest of the
        data, key and settings; ``None`` for no cache. A custom ``make_model`` enters the
        key by its name and parameter shapes only: use a new folder after editing its code.

    Returns:
      ``masks (S, n_train) bool`` and target ``margins (S, n_targets) f32``.
    """
    key = _check_key(key)
    x, y = _check_dataset("train", train)
    xt, yt = _check_dataset("targets", targets)
    if x.shape[1:] != xt.shape[1:]:
        raise ValueError(f"train inputs are {x.shape[1:]} per example but targets are "
                         f"{xt.shape[1:]}; both must share the input shape.")
    if isinstance(num_models, bool) or not isinstance(num_models, (int, np.integer)) \
            or num_models < 1:
        raise ValueError(f"num_models must be a positive integer, got {num_models!r}.")
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be a fraction in (0, 1], e.g. 0.5; got {alpha!r}.")
    n = x.shape[0]
    size = int(round(alpha * n))
    if size < 1:
        raise ValueError(f"alpha={alpha} keeps no example of the {n} training examples.")
    if make_model is None:
        num_classes = int(max(y.max(), yt.max())) + 1
        sizes = (int(np.prod(x.shape[1:])), *(int(h) for h in hidden), num_classes)
        make_model = _MLPFactory(sizes)
        model_id = f"MLP{sizes}"
    else:
        template = nnx.state(nnx.eval_shape(lambda: make_model(nnx.Rngs(0))), nnx.Param)
        shapes = [list(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(template)]
        model_id = [getattr(make_model, "__qualname__", repr(make_model)), shapes]

    path = None
    if cache_dir is not None:
        settings = {"version": _RETRAIN_VERSION, "num_models": int(num_models),
                    "alpha": float(alpha), "model": model_id, "steps": int(steps),
                    "lr": float(lr), "batch_size": int(batch_size)}
        digest = _digest(settings, np.asarray(jax.random.key_data(key)), x, y, xt, yt)
        path = Path(cache_dir) / f"subsets-{digest}.npz"
        if path.exists():
            with np.load(path, allow_pickle=False) as cached:
                return cached["masks"], cached["margins"]

    mask_key, model_key = jax.random.split(key)
    subsets = _subset_indices(mask_key, n, size, int(num_models))
    graphdef, params, rest = train_nnx_models(model_key, make_model, x, y, subsets,
                                              steps=int(steps), lr=float(lr),
                                              batch_size=int(batch_size),
                                              models_at_once=models_at_once)
    margins = nnx_margins(graphdef, params, rest, xt, yt)
    masks = np.zeros((int(num_models), n), bool)
    np.put_along_axis(masks, subsets, True, axis=1)
    if path is not None:
        _save_npz_atomic(path, masks=masks, margins=margins)
    return masks, margins


# --- baselines -------------------------------------------------------------------------

def _features_pair(train_features, target_features) -> tuple[np.ndarray, np.ndarray]:
    a = _as_2d("train_features", train_features, np.float32)
    b = _as_2d("target_features", target_features, np.float32)
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"train_features (n_train, k) has k = {a.shape[1]} but target_features has "
            f"k = {b.shape[1]}; featurize both with the same checkpoint and projector."
        )
    return a, b


def grad_dot_scores(train_features, target_features) -> np.ndarray:
    """Gradient dot product baseline: ``⟨g(z_i), g(z_j)⟩``.

    Args:
      train_features: ``(n_train, k)`` per-example (projected) gradients.
      target_features: ``(n_targets, k)`` the same for the targets.

    Returns:
      ``(n_train, n_targets) f32`` scores.
    """
    a, b = _features_pair(train_features, target_features)
    return (a.astype(np.float64) @ b.T.astype(np.float64)).astype(np.float32)


def grad_cosine_scores(train_features, target_features) -> np.ndarray:
    """Gradient cosine baseline: ``⟨g_i, g_j⟩ / (|g_i| |g_j|)``; zero gradients score 0.

    Args and returns as :func:`grad_dot_scores`.
    """
    a, b = _features_pair(train_features, target_features)
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    norm_a = np.linalg.norm(a, axis=1, keepdims=True)
    norm_b = np.linalg.norm(b, axis=1, keepdims=True)
    a = np.divide(a, norm_a, out=np.zeros_like(a), where=norm_a > 0)
    b = np.divide(b, norm_b, out=np.zeros_like(b), where=norm_b > 0)
    return (a @ b.T).astype(np.float32)


def random_scores(key, n_train: int, n_targets: int) -> np.ndarray:
    """Random baseline: i.i.d. N(0, 1) scores ``(n_train, n_targets) f32`` from ``key``."""
    key = _check_key(key)
    return np.asarray(jax.random.normal(key, (int(n_train), int(n_targets)), jnp.float32))


# --- agreement of two score matrices ---------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ScoreAgreement:
    """How closely scores ``a`` agree with reference scores ``b (n_train, n_targets)``.

    The one comparison of two score matrices: ``trax-attr compare``, the demo's torch
    run and ``interop.compare`` all return it; ``print`` it (or call :meth:`table`).

    Attributes (each ``(n_targets,) f64`` unless noted):
      pearson, spearman: correlations of column j of a and of b over training examples
        (NaN where a column is constant, so a correlation is undefined).
      top_proponents, top_opponents: |top-k(a_j) ∩ top-k(b_j)| / k of the k highest
        (proponents) and the k lowest (opponents) scores.
      sign_agreement: fraction of training examples where sign(a) == sign(b).
      max_rel_diff: max_i |a_ij - b_ij| / max_i |b_ij|, the largest difference relative
        to the target's score scale (entry-wise ratios would blow up near zero scores).
      k: the k of the top-k overlaps (int).
    """

    pearson: np.ndarray
    spearman: np.ndarray
    top_proponents: np.ndarray
    top_opponents: np.ndarray
    sign_agreement: np.ndarray
    max_rel_diff: np.ndarray
    k: int

    @property
    def topk_overlap(self) -> np.ndarray:
        """Alias of ``top_proponents`` ``(n_targets,) f64`` (the name before opponents)."""
        return self.top_proponents

    def rows(self) -> list[tuple[str, np.ndarray, str]]:
        """``(metric name, (n_targets,) values, format spec)`` of each table row."""
        # correlations with 8 digits: twins agree in their 5th to 7th digit
        return [("pearson", self.pearson, ".8f"), ("spearman", self.spearman, ".8f"),
                (f"top-{self.k} proponents", self.top_proponents, ".3f"),
                (f"top-{self.k} opponents", self.top_opponents, ".3f"),
                ("sign agreement", self.sign_agreement, ".4f"),
                ("max rel diff", self.max_rel_diff, ".2e")]

    def table(self) -> str:
        """A plain-text table: each metric's mean, min, median and max over targets
        (NaN entries left out; a metric with none finite shows ``nan``)."""
        lines = [f"{'over ' + str(len(self.pearson)) + ' targets':<18}"
                 + "".join(f"{h:>13}" for h in ("mean", "min", "median", "max"))]
        for name, values, spec in self.rows():
            finite = values[np.isfinite(values)]
            if finite.size:
                stats = (finite.mean(), finite.min(), np.median(finite), finite.max())
                lines.append(f"{name:<18}" + "".join(f"{v:>13{spec}}" for v in stats))
            else:
                lines.append(f"{name:<18}" + "".join(f"{'nan':>13}" for _ in range(4)))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _overlap(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    top_a = np.argsort(-a, axis=0, kind="stable")[:k]
    top_b = np.argsort(-b, axis=0, kind="stable")[:k]
    return np.array([np.intersect1d(top_a[:, j], top_b[:, j]).size / k
                     for j in range(a.shape[1])], np.float64)


def compare_scores(a, b, *, k: int = 10) -> ScoreAgreement:
    """How far scores ``a`` agree with reference scores ``b``, per target (numpy only).

    Args:
      a: ``(n_train, n_targets)`` scores, e.g. from a torch model.
      b: ``(n_train, n_targets)`` reference scores (the scale of ``max_rel_diff``).
      k: size of the top-k sets of proponents and opponents (1..n_train).

    Returns:
      a :class:`ScoreAgreement`; ``print(...)`` shows mean / min / median / max over targets.
    """
    a = _as_2d("a", a, np.float64)
    b = _as_2d("b", b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"score matrices differ in shape: a {a.shape}, b {b.shape}; compare "
                         "scores of the same training set and targets.")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= a.shape[0]:
        raise ValueError(f"k must be an integer in [1, n_train={a.shape[0]}], got {k!r}.")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("scores a and b must be finite; they hold NaN or Inf (rows "
                         f"{np.flatnonzero(~(np.isfinite(a) & np.isfinite(b)).all(1))[:5].tolist()}"
                         "...). Score a finalized experiment or drop those rows.")
    scale = np.abs(b).max(axis=0)
    diff = np.abs(a - b).max(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(scale > 0, diff / scale, np.where(diff > 0, np.inf, 0.0))
    return ScoreAgreement(
        pearson=_pearson_columns(a, b),
        spearman=spearman_columns(a, b),
        top_proponents=_overlap(a, b, k),
        top_opponents=_overlap(-a, -b, k),
        sign_agreement=(np.sign(a) == np.sign(b)).mean(axis=0),
        max_rel_diff=rel,
        k=int(k),
    )
