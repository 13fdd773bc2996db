"""Counterfactual retraining: many small flax.nnx models trained at once on random subsets.

The ground truth of :func:`trax_attr.evaluation.lds`: ``jax.vmap`` over models, ``optax``,
deterministic from its key, with an optional on-disk cache (npz, no pickle).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..hashing import digest
from ..store.writes import replace_file_atomic

__all__ = ["MLP", "train_nnx_models", "nnx_margins", "subset_retraining", "check_key"]

# Bumped whenever the retraining recipe changes, so that old cache files are not reused.
_RETRAIN_VERSION = 1


# --- counterfactual retraining ---------------------------------------------------------

def check_key(key) -> jax.Array:
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
                     lr: float, batch_size: int = 128, models_at_once: int | None = None,
                     same_init: bool = False):
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
      same_init: every model is initialised from ``fold_in(key, 0)`` and draws the same
        minibatch positions within its rows: models then differ only by their data (a
        paired design, which removes the seed noise from differences between models).

    Returns:
      ``(graphdef, params, rest)``: params and rest are ``nnx.State`` whose leaves have a
      leading ``S`` axis; ``nnx.merge(graphdef, params_i, rest_i)`` is model i.
    """
    key = check_key(key)
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
    model_keys = [jax.random.fold_in(key, 0 if same_init else i) for i in range(count)]
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
    from ..tasks import classification_margin

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


def _save_npz_atomic(path: Path, **arrays) -> None:
    replace_file_atomic(path, lambda handle: np.savez(handle, **arrays), binary=True)


def subset_retraining(key, train, targets, *, num_models: int = 256, alpha: float = 0.5,
                      hidden: Sequence[int] = (64,), steps: int = 600, lr: float = 3e-3,
                      batch_size: int = 128, make_model: Callable[[Any], Any] | None = None,
                      models_at_once: int | None = None,
                      cache_dir: str | os.PathLike | None = None,
                      same_init: bool = False) -> tuple[np.ndarray, np.ndarray]:
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
      same_init: all models share one initialisation and minibatch order (see
        :func:`train_nnx_models`), so a target's margin varies over subsets by the data
        alone; the LDS then measures how well scores predict the effect of the data
        rather than that plus the seed-to-seed noise of training.

    Returns:
      ``masks (S, n_train) bool`` and target ``margins (S, n_targets) f32``.
    """
    key = check_key(key)
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
        if same_init:  # only then: caches written before the option keep their names
            settings["same_init"] = True
        key_digest = digest(settings, np.asarray(jax.random.key_data(key)), x, y, xt, yt)
        path = Path(cache_dir) / f"subsets-{key_digest}.npz"
        if path.exists():
            with np.load(path, allow_pickle=False) as cached:
                return cached["masks"], cached["margins"]

    mask_key, model_key = jax.random.split(key)
    subsets = _subset_indices(mask_key, n, size, int(num_models))
    graphdef, params, rest = train_nnx_models(model_key, make_model, x, y, subsets,
                                              steps=int(steps), lr=float(lr),
                                              batch_size=int(batch_size),
                                              models_at_once=models_at_once,
                                              same_init=bool(same_init))
    margins = nnx_margins(graphdef, params, rest, xt, yt)
    masks = np.zeros((int(num_models), n), bool)
    np.put_along_axis(masks, subsets, True, axis=1)
    if path is not None:
        _save_npz_atomic(path, masks=masks, margins=margins)
    return masks, margins
