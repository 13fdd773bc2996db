"""The functional core: TRAK as pure functions of arrays, the kernels the TRAKer streams.

    phi, q = featurize(model, checkpoint, batch, projector=..., model_id=m)   # per batch
    scores = trak_scores(train_features, out_to_loss, target_features)         # in memory

Both are jittable (a torch model on the torch route computes its gradients outside JAX:
call ``featurize`` outside jit then). :func:`trak_scores` runs the very kernels of the
TRAKer's store path (:mod:`trax_attr.streams`, driven by :mod:`trax_attr.pipeline`) over
the same chunks in the same order, so on the same mesh it gives the TRAKer's scores to float32 rounding of nothing but the
inverse's callback (see tests/test_closed_form.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from . import parallel, streams
from .engine import Featurizer, features, host_features, prepare, row_weights
from .engine.linalg import AUTO, check_lambda, choose_solve, inverse, inverse_gram, resolve_lambda
from .parallel import solve as sharded
from .gradients import GradWrt, select
from .models import as_model
from .projection import identity
from .tasks import get_task

__all__ = ["featurize", "trak_scores", "xtx", "solve"]


def featurize(model, checkpoint, batch: tuple, *, task="image_classification",
              projector=None, seed: int = 0, model_id: int = 0, grad_wrt: GradWrt = None,
              mesh=None) -> tuple[jax.Array, jax.Array]:
    """Features of one batch with one checkpoint, as a pure function (jit it freely).

    Args:
      model: anything ``TRAKer(model=...)`` accepts, or a :class:`Model`.
      checkpoint: its weights, as for ``TRAKer.load_checkpoint``.
      batch: tuple of arrays with a leading batch axis B.
      task, projector, seed, grad_wrt: as for ``TRAKer`` (projector defaults to identity).
      model_id: the checkpoint's id; its projection key is fold_in(key(seed), model_id).
      mesh: None (one device, no sharding) or the mesh the TRAKer uses, for its exact
        kernel (the batch is padded to a multiple of its batch shards, as the TRAKer does).

    Returns:
      ``phi (B, k) f32`` projected gradients and ``q (B,) f32`` out-to-loss terms.
    """
    model = as_model(model)
    params, state = model.split(checkpoint)
    f = Featurizer(get_task(task), model, select(params, grad_wrt), projector or identity())
    ckpt = prepare(f, params, state, seed, model_id)
    batch = tuple(batch)
    if model.host_grads is not None:
        return host_features(f, ckpt, batch)
    if mesh is None:
        return _features(f, ckpt, batch)
    mesh = parallel.check_mesh(mesh)
    size = batch[0].shape[0]
    extra = -size % parallel.batch_shards(mesh)
    if extra:  # repeat row 0, as parallel.pad_batch does on the host; works inside jit
        batch = tuple(jnp.concatenate([a, jnp.repeat(a[:1], extra, axis=0)]) for a in batch)
    phi, q = parallel.featurize(f, mesh, ckpt, batch)
    return phi[:size], q[:size]


# one compiled program per featurizer and batch shape when called outside jit (inlined
# inside a caller's jit): op-by-op dispatch compiles every primitive on its own
_features = jax.jit(features, static_argnums=0)


def xtx(features: jax.Array, dtype=jnp.float32) -> jax.Array:
    """ΦᵀΦ ``(k, k)`` of ``features (n, k)``, accumulated in ``dtype``."""
    x = features.astype(dtype)
    return jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)


def solve(features: jax.Array, gram: jax.Array, lambda_reg: float = 0.0, *,
          traker_inverse_rescale: bool = False) -> jax.Array:
    """Φ·(ΦᵀΦ + λI)⁻¹ ``(n, k) f32``, with the inverse of :func:`trak_scores` (usable
    inside jit).

    Args:
      features: ``(n, k)`` f32 training features Φ.
      gram: ``(k, k)`` ΦᵀΦ, e.g. :func:`xtx`.
      lambda_reg: λ ≥ 0 or ``"auto"``.
      traker_inverse_rescale: divide A by mean|A| as traker 0.3.2 does.
    """
    a, _ = inverse(gram.astype(jnp.float32), features.shape[0], lambda_reg,
                   traker_inverse_rescale=traker_inverse_rescale)
    return jnp.matmul(features.astype(jnp.float32), a, precision=jax.lax.Precision.HIGHEST)


def _chunks(x: jax.Array, chunk: int, shape: int) -> jax.Array:
    """``x (n, ...)`` as ``(ceil(n / chunk), shape, ...)``: chunks of ``chunk`` rows, each
    padded with zero rows to ``shape`` rows, as the store path reads and pads them."""
    n = x.shape[0]
    count = -(-n // chunk)
    x = jnp.pad(x, [(0, count * chunk - n)] + [(0, 0)] * (x.ndim - 1))
    x = x.reshape((count, chunk) + x.shape[1:])
    return jnp.pad(x, [(0, 0), (0, shape - chunk)] + [(0, 0)] * (x.ndim - 2))


def _gram(x: jax.Array, chunk: int, mesh) -> jax.Array:
    blocks = _chunks(x, chunk, parallel.round_up(chunk, mesh.size))
    k = x.shape[1]
    return jax.lax.fori_loop(0, blocks.shape[0],
                             lambda i, g: g + parallel.gram(blocks[i], mesh),
                             jnp.zeros((k, k), jnp.float32))


def _inverse_sharded(x, n, chunk, lambda_reg, rescale, mesh, dtype):
    """The sharded solve of the store path (:mod:`trax_attr.parallel.solve`) on the same
    chunks: ``A (k, k)``, gathered (this is the in-memory path)."""
    k = x.shape[1]
    smesh = sharded.solve_mesh(mesh)
    lay = sharded.layout(k, smesh.size)
    blocks = _chunks(x, chunk, parallel.round_up(chunk, smesh.size))
    acc = jax.lax.fori_loop(0, blocks.shape[0],
                            lambda i, acc: sharded.accumulate(acc, blocks[i], smesh, lay),
                            sharded.zeros(smesh, lay, np.dtype(dtype)))
    a, _ = sharded.inverse_in_jit(acc, n, lambda_reg, smesh, lay,
                                  traker_inverse_rescale=rescale)
    # whole on every device, as the store path folds it: T's rows then come from the same
    # products (a fold split by rows would sum each row in another order)
    return jax.lax.with_sharding_constraint(a[:k, :k], NamedSharding(smesh, P()))


def _inverse_f64(x, n, chunk, lambda_reg, rescale):
    """XᵀX accumulated in float64 on the host (as the store path does) and its inverse."""
    def host(rows):
        rows = np.asarray(rows)
        gram = streams.stream_gram(lambda a, b: rows[a:b], range(n), rows.shape[1], chunk,
                                    None, np.float64)
        value = resolve_lambda(lambda_reg, gram, n)
        a = inverse_gram(gram, value, traker_inverse_rescale=rescale)
        return a.astype(np.float32), np.float32(value)

    k = x.shape[1]
    shapes = (jax.ShapeDtypeStruct((k, k), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32))
    return jax.pure_callback(host, shapes, x, vmap_method="sequential")


def trak_scores(train_features: jax.Array, out_to_loss: jax.Array, target_features: jax.Array,
                lambda_reg=AUTO, *, xtx_dtype=jnp.float32, traker_inverse_rescale: bool = False,
                chunk_rows: int | None = None, mesh=None, solve: str = "auto") -> jax.Array:
    """TRAK scores of an ensemble, all in memory; pure and jittable.

    Args:
      train_features: ``(M, n, k)`` f32 projected training gradients Φ_m.
      out_to_loss: ``(M, n)`` f32 out-to-loss terms Q_m of the training examples.
      target_features: ``(M, m, k)`` f32 projected target gradients φ_m.
      lambda_reg: λ added to each XᵀX: ``"auto"`` (the TRAKer's default rule, per
        checkpoint) or a number ≥ 0.
      xtx_dtype: accumulation dtype of XᵀX (float64 is accumulated on the host).
      traker_inverse_rescale: divide each A_m by mean|A_m| as traker 0.3.2 does.
      chunk_rows: rows per chunk, as ``TRAKer(chunk_rows=...)`` (None: the same default).
      mesh: the mesh of the kernels (None: all local devices, as the TRAKer's default).
      solve: ``"host"``, ``"sharded"`` or ``"auto"``, as ``TRAKer.finalize_features``.

    Returns:
      ``(n, m)`` f32 scores τ.
    """
    lambda_reg = check_lambda(lambda_reg)
    mesh = parallel.check_mesh(mesh)
    train = jnp.asarray(train_features, jnp.float32)
    targets = jnp.asarray(target_features, jnp.float32)
    count, n, k = train.shape
    m = targets.shape[1]
    gram_chunk = streams.chunk_rows(k, 1, chunk_rows)
    solve = choose_solve(solve, k, xtx_dtype)
    inverses = []
    for i in range(count):
        if solve == "sharded":
            a = _inverse_sharded(train[i], n, gram_chunk, lambda_reg, traker_inverse_rescale,
                                 mesh, xtx_dtype)
        elif np.dtype(xtx_dtype) == np.float64:
            a, _ = _inverse_f64(train[i], n, gram_chunk, lambda_reg, traker_inverse_rescale)
        else:
            a, _ = inverse(_gram(train[i], gram_chunk, mesh), n, lambda_reg,
                           traker_inverse_rescale=traker_inverse_rescale)
        inverses.append(a)
    folded = parallel.fold(jnp.stack(inverses), targets)
    chunk = streams.chunk_rows(k, count, chunk_rows)
    rows, cols = streams.score_shapes(chunk, m, mesh)
    folded = jnp.pad(folded, [(0, 0), (0, 0), (0, cols - m)])
    weights = _chunks(row_weights(jnp.asarray(out_to_loss, jnp.float32)), chunk, rows)
    blocks = jax.vmap(lambda t: _chunks(t, chunk, rows))(train)        # (M, C, rows, k)

    def one(i):
        return parallel.scores(blocks[:, i], folded, weights[i], mesh)[:chunk]

    out = jax.lax.map(one, jnp.arange(weights.shape[0]))               # (C, chunk, cols)
    return out.reshape(-1, cols)[:n, :m]
