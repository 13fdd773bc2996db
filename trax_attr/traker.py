"""TRAKer: the familiar stateful shell over the functional core and the on-disk store.

The workflow is traker's::

    traker = TRAKer(model=model, task="image_classification", train_set_size=n,
                    save_dir="./trak_results", proj_dim=2048)
    for model_id, checkpoint in enumerate(checkpoints):
        traker.load_checkpoint(checkpoint, model_id=model_id)
        for batch in train_batches:
            traker.featurize(batch=batch, num_samples=len(batch[0]))
    traker.finalize_features()
    for model_id, checkpoint in enumerate(checkpoints):
        traker.start_scoring_checkpoint(exp_name="test", checkpoint=checkpoint,
                                        model_id=model_id, num_targets=m)
        for batch in target_batches:
            traker.score(batch=batch, num_samples=len(batch[0]))
    scores = traker.finalize_scores(exp_name="test")      # (n, m) float32

Only this class holds state; the math lives in features.py and scoring.py, the files in
store.py. Every step is resumable: rows already on disk are skipped.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .checks import (NonFiniteError, NonFiniteWarning, check_labels, check_nonfinite_mode,
                     nonfinite_rows, num_classes)
from .features import Featurizer, featurize_fn, host_featurize_fn, inverse_gram
from .gradients import GradWrt, Selection, select
from . import sharding
from .models import Model, as_model
from .projection import Projector, get_projector, projection_cache, projection_key
from .store import Store, StoreBusyError, check_model_id, read_rows, write_rows
from .tasks import ModelOutput, get_task

__all__ = ["TRAKer"]

logger = logging.getLogger(__name__)

# What rank 0 of a job decided about finalizing one checkpoint (broadcast to every rank).
_SKIP, _GO, _BUSY, _FAILED = 0, 1, 2, 3
_CHUNK_BYTES = 8 << 20     # default chunk_rows: 8 MiB of float32 features per chunk
_DONE_CHUNK = 1 << 20      # rows of a done bitmap (1 byte each) read at once

# Compiled featurizers shared by the TRAKers of one process (a fresh TRAKer for the same
# model would otherwise trace and compile again: ~0.7 s for a small MLP on 2 cores).
_COMPILED: collections.OrderedDict = collections.OrderedDict()
_COMPILED_MAX = 16


def _compiled_featurizer(f: Featurizer, mesh, proj_dim: int | None, with_out_to_loss: bool):
    """``sharding.shard_featurize(featurize_fn(f))``, reused for equal settings.

    Two featurizers are the same function when their models' ``cache_key`` and their
    task, selection, projector, mesh, proj_dim and out-to-loss flag are equal; a model
    without a key (``cache_key=None``) or an unhashable task always gets a fresh one.
    """
    def build():
        return sharding.shard_featurize(featurize_fn(f, with_out_to_loss=with_out_to_loss),
                                        mesh, proj_dim)

    if f.model.cache_key is None:
        return build()
    key = (f.model.cache_key, f.task, f.selection, f.projector, mesh, proj_dim,
           with_out_to_loss)
    try:
        fn = _COMPILED.get(key)
    except TypeError:  # e.g. a task holding arrays
        return build()
    if fn is None:
        fn = _COMPILED[key] = build()
        if len(_COMPILED) > _COMPILED_MAX:
            _COMPILED.popitem(last=False)
    else:
        _COMPILED.move_to_end(key)
    return fn


def fingerprint(*trees) -> str:
    """A digest of every array in ``trees``: equal weights, equal fingerprint."""
    digest = hashlib.blake2b(digest_size=16)
    for tree in trees:
        for leaf in jax.tree_util.tree_leaves(tree):
            array = np.asarray(leaf)
            digest.update(str((array.dtype.str, array.shape)).encode())
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


@dataclass
class _Loaded:
    """A checkpoint ready to featurize or score."""

    model_id: int
    selected: tuple
    rest: tuple
    state: Any
    key: jax.Array
    cache: tuple | None
    fingerprint: str


def _describe_task(task: ModelOutput) -> str:
    """A description of the task that is stable across processes (no memory addresses)."""
    name = f"{type(task).__module__}.{type(task).__qualname__}"
    if dataclasses.is_dataclass(task):
        fields = ", ".join(f"{f.name}={getattr(task, f.name)!r}" for f in dataclasses.fields(task))
        return f"{name}({fields})"
    return name


def _describe_grad_wrt(grad_wrt: GradWrt):
    if grad_wrt is None or isinstance(grad_wrt, str):
        return grad_wrt
    if callable(grad_wrt):
        return f"callable:{getattr(grad_wrt, '__qualname__', repr(grad_wrt))}"
    return list(grad_wrt)


class TRAKer:
    """Attribute a model's outputs on targets to its training examples with TRAK.

    Args:
      model: a ``flax.nnx.Module``, a ``flax.linen.Module``, a function
        ``apply_fn(params, *inputs)``, a ``torch.nn.Module`` (needs the ``interop``
        extra; checkpoints are state_dicts or paths to them), or a
        :class:`trax_attr.Model`.
      task: a task name (``"image_classification"``), or a :class:`ModelOutput`.
      train_set_size: n, the number of training examples.
      save_dir: folder of the store; an existing store is resumed if its settings match.
      proj_dim: k, the projected dimension (ignored by the identity projector).
      projector: ``"rademacher"``, ``"normal"``, ``"identity"`` or a :class:`Projector`.
      seed: seed of the projection; checkpoint m uses fold_in(key(seed), m).
      lambda_reg: λ ≥ 0 added to XᵀX.
      grad_wrt: which parameters to differentiate (see :func:`trax_attr.select`).
      proj_dtype: compute dtype of the projection matmul (bfloat16: fast; float32: exact).
      xtx_dtype: accumulation dtype of XᵀX, ``np.float32`` or ``np.float64``.
      traker_inverse_rescale: divide each (XᵀX + λI)⁻¹ by its mean absolute entry, as
        traker 0.3.2 does (for score parity with it; off by default).
      chunk_rows: rows of the store read at once by finalize steps; bounds memory.
        ``None`` (default): as many rows as fit in 8 MiB of float32 features (4096 rows at
        k = 512, 1024 at k = 2048; over all checkpoints at once when scoring), at least
        256.
      nonfinite: what to do with examples whose inputs, outputs or gradients hold NaN or
        Inf: ``"raise"`` (a :class:`NonFiniteError` naming them; nothing of the batch is
        written) or ``"zero"`` (store them as zero rows, which get score 0, with a
        :class:`NonFiniteWarning` giving how many; see :meth:`zeroed_rows`).
      backend: torch modules only: ``"converted"`` (default; the module as a JAX
        function) or ``"torch"`` (per-example gradients in torch with torch.func).
      progress: show a tqdm progress bar (rows and rows/s) per checkpoint while
        featurizing and scoring; off by default.
      mesh: the ``jax.sharding.Mesh`` of this process's devices that batches, XᵀX and
        scores are split over (see :mod:`trax_attr.sharding`); None: all local devices.
        Results do not depend on it. Several processes (jax.distributed) share one store:
        each featurizes its own rows (``inds=``), all call finalize_features.
    """

    def __init__(self, model, task: str | ModelOutput = "image_classification",
                 train_set_size: int | None = None, save_dir: str = "./trak_results", *,
                 proj_dim: int = 2048, projector: str | Projector = "rademacher", seed: int = 0,
                 lambda_reg: float = 0.0, grad_wrt: GradWrt = None, proj_dtype=jnp.bfloat16,
                 xtx_dtype=np.float32, traker_inverse_rescale: bool = False,
                 chunk_rows: int | None = None, nonfinite: str = "raise", mesh=None,
                 backend: str | None = None, progress: bool = False):
        if (isinstance(train_set_size, bool) or not isinstance(train_set_size, (int, np.integer))
                or train_set_size < 1):
            raise ValueError(
                f"train_set_size must be a positive integer (the number of training "
                f"examples), got {train_set_size!r}."
            )
        if (isinstance(lambda_reg, bool) or not isinstance(lambda_reg, (int, float, np.number))
                or not (math.isfinite(lambda_reg) and lambda_reg >= 0)):
            raise ValueError(f"lambda_reg must be a finite number >= 0, got {lambda_reg!r}; use "
                             "0.0 (none) or a small ridge such as 1e-3.")
        if np.dtype(xtx_dtype) not in (np.float32, np.float64):
            raise ValueError(f"xtx_dtype must be np.float32 or np.float64, got {xtx_dtype!r}.")
        if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(
                chunk_rows, (int, np.integer)) or chunk_rows < 1):
            raise ValueError(f"chunk_rows must be a positive integer or None (sized from "
                             f"proj_dim), got {chunk_rows!r}.")
        self.model: Model = as_model(model, backend=backend)
        self.task: ModelOutput = get_task(task)
        self.projector: Projector = get_projector(projector, proj_dim, proj_dtype)
        self.train_set_size = int(train_set_size)
        self.seed = int(seed)
        self.lambda_reg = float(lambda_reg)
        self.grad_wrt = grad_wrt
        self.xtx_dtype = np.dtype(xtx_dtype)
        self.traker_inverse_rescale = bool(traker_inverse_rescale)
        self.chunk_rows = None if chunk_rows is None else int(chunk_rows)
        self.nonfinite = check_nonfinite_mode(nonfinite)
        self._num_classes: int | None = None
        self.mesh = sharding.check_mesh(mesh)
        if sharding.PROJ_AXIS in self.mesh.axis_names and self.projector.kind == "identity":
            raise ValueError(
                f"mesh has a {sharding.PROJ_AXIS!r} axis, which splits proj_dim over devices, "
                "but the identity projector has no proj_dim to split; use a mesh without it.")
        self.store = Store(save_dir, {
            "train_set_size": self.train_set_size,
            "task": _describe_task(self.task),
            "projector": self.projector.kind,
            "proj_dim": self.projector.proj_dim,
            "proj_dtype": self.projector.dtype,
            "seed": self.seed,
            "lambda_reg": self.lambda_reg,
            "grad_wrt": _describe_grad_wrt(grad_wrt),
            "xtx_dtype": self.xtx_dtype.name,
            "traker_inverse_rescale": self.traker_inverse_rescale,
        })
        self.save_dir = self.store.root
        self._selection: Selection | None = None
        self._featurize = None
        self._featurize_targets = None
        self._loaded: _Loaded | None = None
        self._train_cursor = 0
        self._scoring: dict[str, Any] | None = None
        self.progress = bool(progress)
        self._bar = None
        self._bar_label = None

    # --- checkpoints ---------------------------------------------------------------------
    @property
    def grad_dim(self) -> int:
        """d, the number of differentiated parameters (known after load_checkpoint)."""
        if self._selection is None:
            raise ValueError("grad_dim is known after the first load_checkpoint call.")
        return self._selection.grad_dim

    @property
    def proj_dim(self) -> int:
        """k, the width of the stored features: known after load_checkpoint, or from the
        store's settings when a TRAKer reopens a store that holds features."""
        if self.projector.kind == "kronecker":
            # its k follows from the model's layers: learned from the first batch and kept
            # in the store's settings (see _learn_width)
            width = self.store.config.get("feature_dim")
            if width is None:
                raise ValueError("the kronecker projector's width is known once a batch has "
                                 "been featurized; call featurize first.")
            return int(width)
        if self._selection is not None:
            return self.projector.output_dim(self.grad_dim)
        grad_dim = self.store.config.get("grad_dim")
        if grad_dim is None:
            raise ValueError("proj_dim is known after the first load_checkpoint call (the "
                             "store holds no features yet).")
        return self.projector.output_dim(grad_dim)

    def _learn_width(self, loaded: _Loaded, batch) -> None:
        """Record the kronecker projector's k, from the shapes of one traced batch."""
        if self.projector.kind != "kronecker" or "feature_dim" in self.store.config:
            return
        phi, _ = jax.eval_shape(self._featurize_targets, loaded.selected, loaded.rest,
                                loaded.state, loaded.key, loaded.cache,
                                sharding.pad_batch(batch, sharding.batch_shards(self.mesh)))
        self.store.check_config({"feature_dim": int(phi.shape[1])})

    def _prepare(self, checkpoint, model_id: int) -> _Loaded:
        params, state = self.model.split(checkpoint)
        if self._selection is None:
            self._selection = select(params, self.grad_wrt)
            f = Featurizer(self.task, self.model, self._selection, self.projector)
            k = (None if self.projector.kind == "kronecker"
                 else self.projector.output_dim(self._selection.grad_dim))
            if self.model.host_grads is None:
                self._featurize = _compiled_featurizer(f, self.mesh, k, True)
                self._featurize_targets = _compiled_featurizer(f, self.mesh, k, False)
            else:
                # gradients come from the host (torch); only their projection is jitted
                self._featurize = host_featurize_fn(f)
                self._featurize_targets = host_featurize_fn(f, with_out_to_loss=False)
            self.store.check_config({
                "grad_dim": self._selection.grad_dim,
                "parameters": list(self._selection.paths),
                "parameter_shapes": [list(np.shape(leaf))
                                     for leaf in self._selection.split(params)[0]]})
        else:
            self._check_structure(params)
        selected, rest = self._selection.split(params)
        key = projection_key(self.seed, model_id)
        cache = projection_cache(self.projector, key, self._selection.sizes)
        return _Loaded(model_id, selected, rest, state, key, cache, fingerprint(params, state))

    def _check_structure(self, params) -> None:
        try:
            selection = select(params, self.grad_wrt)
        except ValueError as err:
            raise ValueError(f"this checkpoint does not fit the first one: {err}") from None
        if (selection.paths, selection.sizes) != (self._selection.paths, self._selection.sizes):
            diffs = [f"{p}: {s}" for p, s in zip(selection.paths, selection.sizes)
                     if (p, s) not in set(zip(self._selection.paths, self._selection.sizes))]
            raise ValueError(
                "this checkpoint's parameters differ in names or shapes from the first "
                f"checkpoint's (differing: {', '.join(diffs[:8]) or 'parameter count'}). All "
                "checkpoints of one TRAKer must be of the same architecture."
            )

    def load_checkpoint(self, checkpoint, model_id: int) -> None:
        """Make ``checkpoint`` the one featurized next, under ``model_id``.

        Args:
          checkpoint: a params pytree (plain function), a variables dict (linen), an
            nnx Module or State (nnx, None for the module's own weights).
          model_id: non-negative integer naming the checkpoint in the store.
        """
        model_id = check_model_id(model_id)
        loaded = self._prepare(checkpoint, model_id)
        meta = self.store.create_model(model_id, loaded.fingerprint)
        if meta["fingerprint"] != loaded.fingerprint:
            raise ValueError(
                f"model_id={model_id} in {str(self.save_dir)!r} holds features of a different "
                "checkpoint (its weights' fingerprint differs). Give this checkpoint a new "
                "model_id, or use another save_dir."
            )
        self._loaded = loaded
        self._train_cursor = 0

    # --- batches -------------------------------------------------------------------------
    def _rows(self, batch, inds, num_samples, cursor: int, limit: int, what: str):
        if not isinstance(batch, (tuple, list)) or not batch:
            raise TypeError(
                f"batch must be a tuple of arrays with a leading batch axis, e.g. (x, y); got "
                f"{type(batch).__name__}."
            )
        batch = tuple(batch)
        sizes = {np.shape(a)[0] if np.ndim(a) else None for a in batch}
        if len(sizes) != 1 or None in sizes:
            raise ValueError(
                f"every array of batch needs the same leading batch axis; got shapes "
                f"{[np.shape(a) for a in batch]}."
            )
        size = sizes.pop()
        if inds is None:
            count = size if num_samples is None else num_samples
            if count != size:
                raise ValueError(
                    f"num_samples={num_samples} but the batch holds {size} examples; pass "
                    "num_samples=len(batch[0]) or explicit inds."
                )
            inds = np.arange(cursor, cursor + size)
        else:
            if num_samples is not None and num_samples != size:
                raise ValueError(
                    f"num_samples={num_samples} but the batch holds {size} examples; pass "
                    "num_samples=len(batch[0]) or leave it out when giving inds."
                )
            inds = np.asarray(inds)
            if (not np.issubdtype(inds.dtype, np.integer) or inds.dtype == np.bool_
                    or inds.shape != (size,)):
                raise ValueError(
                    f"inds must be {size} integers, one per example of the batch; got "
                    f"{inds.dtype}{list(inds.shape)}. Pass e.g. np.arange(start, start + {size})."
                )
        out = (inds < 0) | (inds >= limit)
        if out.any():
            raise ValueError(
                f"{what} rows {inds[out][:8].tolist()} ({int(out.sum())} of this batch) are out "
                f"of range [0, {limit}); check inds, or the batches' total against the size "
                f"given when the store was set up ({what} set size {limit})."
            )
        unique, counts = np.unique(inds, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"inds holds duplicates {unique[counts > 1][:8].tolist()}; each row "
                             "of a batch must be a different example: drop the repeats.")
        return batch, inds

    @staticmethod
    def _todo(batch, inds, done):
        """The part of the batch whose rows are not done, padded to a power-of-two size."""
        todo = np.flatnonzero(done[inds] == 0)
        if todo.size == 0:
            return None, None
        if todo.size == len(inds):
            return batch, inds
        padded = min(len(inds), 1 << int(math.ceil(math.log2(todo.size))))
        take = np.concatenate([todo, np.full(padded - todo.size, todo[0])])
        return tuple(np.asarray(a)[take] for a in batch), inds[todo]

    def _check_batch(self, loaded: _Loaded, batch, inds) -> None:
        """Labels of a classification batch: integers in range (JAX would clamp them)."""
        if self._num_classes is None:
            params = self._selection.merge(loaded.selected, loaded.rest)
            self._num_classes = num_classes(self.task, self.model, params, loaded.state, batch)
        check_labels(self.task, batch, inds, self._num_classes)

    def _nonfinite_error(self, what: str, inds, bad) -> None:
        raise NonFiniteError(
            f"{what} of examples {inds[bad][:8].tolist()} ({int(bad.sum())} in this batch) hold "
            "NaN or Inf; nothing of this batch was written. Fix those examples (or the model "
            "on them), or pass TRAKer(..., nonfinite='zero') to store them as zero rows "
            "(score 0) and be told how many."
        )

    def _finish_rows(self, rows, work, results: dict[str, np.ndarray], kind: str):
        """Zero or refuse non-finite rows; returns (results, done flags (R,) u1).

        The inputs are examined only when a result is non-finite (to name the cause), so
        clean batches pay nothing for it; a non-finite input that reaches no result cannot
        change any score.
        """
        found = {name: nonfinite_rows(values) for name, values in results.items()}
        bad = np.logical_or.reduce(list(found.values()))
        if bad.any() and self.nonfinite == "raise":
            inputs = nonfinite_rows(*(np.asarray(a)[: len(rows)] for a in work)) & bad
            if inputs.any():
                self._nonfinite_error("inputs", rows, inputs)
            name = next(name for name, rows_bad in found.items() if rows_bad.any())
            self._nonfinite_error(name, rows, found[name])
        if bad.any():
            results = {name: np.where(bad.reshape((-1,) + (1,) * (v.ndim - 1)), 0, v)
                       .astype(v.dtype) for name, v in results.items()}
            warnings.warn(
                f"{int(bad.sum())} {kind} examples hold NaN or Inf in their inputs, outputs or "
                f"gradients (e.g. {rows[bad][:8].tolist()}); stored as zero rows (score 0) as "
                "nonfinite='zero' asks. TRAKer.zeroed_rows lists them all.",
                NonFiniteWarning, stacklevel=3)
        return results, np.where(bad, 2, 1).astype(np.uint8)

    def finalized(self, model_id: int) -> bool:
        """Whether ``model_id``'s features are finalized (a resumed script skips it)."""
        meta = self.store.model_meta(check_model_id(model_id))
        return bool(meta and meta["finalized"])

    def zeroed_rows(self, model_id: int, exp_name: str | None = None) -> np.ndarray:
        """Rows stored as zeros because of NaN or Inf (``nonfinite="zero"``), ``(r,) int64``.

        Args:
          model_id: the checkpoint.
          exp_name: None for training rows, else the experiment whose target rows to list.
        """
        model_id = check_model_id(model_id)
        if exp_name is None:
            path = self.store.model_dir(model_id) / "done.npy"
        else:
            path = self.store.experiment_dir(exp_name) / f"{model_id}_done.npy"
        if not path.exists():
            return np.zeros(0, np.int64)
        return np.flatnonzero(np.load(path, mmap_mode="r", allow_pickle=False) == 2)

    def featurize(self, batch: Sequence, num_samples: int | None = None,
                  inds: np.ndarray | None = None) -> None:
        """Project the training examples of ``batch`` and store their rows.

        Args:
          batch: tuple of arrays with a leading batch axis B, labels last for
            classification, e.g. ``(images (B, ...), labels (B,))``.
          num_samples: B; the rows are the next B after the previous batch of this
            checkpoint (the first batch after load_checkpoint starts at row 0).
          inds: ``(B,)`` explicit row indices instead of ``num_samples``.

        Rows already on disk are skipped, so re-running an interrupted loop resumes it.
        """
        loaded = self._require_loaded()
        batch, inds = self._rows(batch, inds, num_samples, self._train_cursor,
                                 self.train_set_size, "training")
        with self.store.model_lock(loaded.model_id, shared=True, doing="featurize"):
            if self.store.model_meta(loaded.model_id)["finalized"]:
                raise ValueError(
                    f"model_id={loaded.model_id} is already finalized; its features are fixed. "
                    "Featurize new checkpoints under a new model_id (or use another save_dir); "
                    "a resumed script can skip checkpoints where traker.finalized(model_id)."
                )
            self._check_batch(loaded, batch, inds)
            self._learn_width(loaded, batch)
            arrays = self.store.model_arrays(loaded.model_id, self.train_set_size, self.proj_dim)
            work, rows = self._todo(batch, inds, arrays["done"])
            if work is not None:
                label = f"featurize model {loaded.model_id}"
                self._advance(label, arrays["done"], 0)
                self._featurize_rows(loaded, work, rows, arrays)
                self._advance(label, arrays["done"], len(rows))
        # only a batch that is on disk moves the cursor: a failed call can be repeated as is
        self._train_cursor = int(inds.max()) + 1 if inds.size else self._train_cursor

    def _featurize_rows(self, loaded: _Loaded, work, rows, arrays) -> None:
        phi, q = self._featurize(loaded.selected, loaded.rest, loaded.state, loaded.key,
                                 loaded.cache,
                                 sharding.pad_batch(work, sharding.batch_shards(self.mesh)))
        results, flags = self._finish_rows(
            rows, work, {"projected gradients": np.asarray(phi)[: len(rows)],
                               "out-to-loss values (from the model outputs)":
                                   np.asarray(q)[: len(rows)]}, "training")
        phi, q = results.values()
        self.store.write_rows(arrays, rows, {"grads": phi, "out_to_loss": q}, flags)

    def _advance(self, label: str, done: np.ndarray, count: int) -> None:
        """Move the progress bar of ``label`` by ``count`` newly stored rows (0 before a
        batch's work, so that the rate counts from the first batch)."""
        if not self.progress:
            return
        if self._bar_label != label:
            if self._bar is not None:
                self._bar.close()
            from tqdm.auto import tqdm  # only when asked for

            self._bar = tqdm(total=len(done), initial=int(np.count_nonzero(done)) - count,
                             desc=label,
                             unit="rows", dynamic_ncols=True)
            self._bar_label = label
        if count:
            self._bar.update(count)
        if self._bar.n >= self._bar.total:
            self._bar.close()
            self._bar, self._bar_label = None, None

    def _require_loaded(self) -> _Loaded:
        if self._loaded is None:
            raise ValueError("no checkpoint is loaded: call load_checkpoint(checkpoint, "
                             "model_id) before featurize.")
        return self._loaded

    # --- finalize features ---------------------------------------------------------------
    def finalize_features(self, model_ids: Sequence[int] | None = None) -> None:
        """Solve (XᵀX + λI)⁻¹ for each featurized checkpoint and store Φ·A.

        Args:
          model_ids: the checkpoints to finalize; all featurized ones by default.
            Already finalized checkpoints are kept as they are.

        The store is streamed in ``chunk_rows`` chunks. With several processes every one of
        them calls this: each sums XᵀX over its :func:`~trax_attr.sharding.process_rows`,
        the sums are gathered, and each writes Φ·A for its rows.
        """
        sharding.barrier()  # every process has written its rows
        ids = self.store.model_ids() if model_ids is None else [check_model_id(i) for i in model_ids]
        if not ids:
            raise ValueError("nothing to finalize: no checkpoint has been featurized in "
                             f"{str(self.save_dir)!r}. Call load_checkpoint and featurize first.")
        k = self._stored_proj_dim()
        n = self.train_set_size
        for model_id in ids:
            meta = self.store.model_meta(model_id)
            if meta is None:
                raise ValueError(f"model_id={model_id} was never featurized; featurized ids are "
                                 f"{self.store.model_ids()}.")
            if meta["finalized"] and jax.process_count() == 1:
                continue  # no lock needed: a finalized read-only store can be scored
            with self._finalize_lock(model_id) as go:
                if go:
                    self._finalize_one(model_id, n, k)
                    logger.info("finalized features of model_id=%d (n=%d, k=%d)",
                                model_id, n, k)

    @contextlib.contextmanager
    def _finalize_lock(self, model_id: int):
        """Exclusive finalize lock of ``model_id`` for this whole jax.distributed job.

        Yields whether to finalize (False: it is finalized already). One process, rank 0,
        takes the store's exclusive flock for the job and the decision it reaches is
        broadcast: the other ranks of the job write their rows of features.npy without
        taking the lock themselves (each taking it would deadlock: exclusive flocks of one
        job's processes exclude each other). They only touch the store after the broadcast,
        i.e. while rank 0 holds the lock, so other jobs (featurize, finalize) stay excluded.
        Rank 0 also creates the features temp file before the broadcast. Every rank raises
        (StoreBusyError when rank 0 could not get the lock, RuntimeError when rank 0 failed
        otherwise, rank 0 its own error), so no rank is left waiting at a barrier. With one
        process this is simply the exclusive lock.
        """
        first = jax.process_index() == 0
        with contextlib.ExitStack() as held:
            status, error = _SKIP, None
            if first:
                try:
                    held.enter_context(self.store.model_lock(
                        model_id, shared=False, doing="finalize_features of"))
                    # another process may have finished it while we looked
                    status = _SKIP if self.store.model_meta(model_id)["finalized"] else _GO
                    if status == _GO:  # before the broadcast: the other ranks write into it
                        self.store.begin_features(model_id, self.train_set_size,
                                                  self._stored_proj_dim())
                except Exception as err:  # every rank must hear of it, or they would hang
                    status, error = (_BUSY if isinstance(err, StoreBusyError) else _FAILED), err
            status = int(sharding.process_sum(
                np.array([status if first else 0], np.int32))[0])
            if error is not None:
                raise error
            if status == _BUSY:
                raise StoreBusyError(
                    f"cannot finalize_features of model_id={model_id} in "
                    f"{str(self.save_dir)!r}: process 0 of this job found another process "
                    f"featurizing or finalizing it (locks/model-{model_id}.lock). Wait until "
                    "that process is done, then call again.")
            if status == _FAILED:
                raise RuntimeError(
                    f"process 0 of this job could not start finalize_features of "
                    f"model_id={model_id}; its own error says why and what to do.")
            try:
                yield status == _GO
            except BaseException:
                if first and status == _GO:
                    self.store.discard_features(model_id)
                raise
            sharding.barrier()  # rank 0 keeps the lock until every rank is done

    def _finalize_one(self, model_id: int, n: int, k: int) -> None:
        """Stream XᵀX over this process's rows, sum it over processes, write Φ·A rows.

        Every rank reads the whole done bitmap, so all of them raise the same error on
        missing rows (none waits at a barrier for a rank that has given up).
        """
        done = self.store.array_path(model_id, "done")
        if done.exists():  # shapes, dtypes, and no done flags without their values
            self.store.model_arrays(model_id, n, k, mode="r")
        missing, count = self._missing_rows(done, n)
        if count:
            raise ValueError(
                f"model_id={model_id} is missing {count} of {n} training rows (e.g. "
                f"{missing}); featurize them before finalize_features."
            )
        grads = self.store.array_path(model_id, "grads")
        mine = sharding.process_rows(n)
        gram = sharding.stream_gram(lambda a, b: read_rows(grads, a, b), mine, k,
                                    self._chunk(k), self.mesh, self.xtx_dtype)
        gram = sharding.process_sum(gram)
        inverse = inverse_gram(gram, self.lambda_reg,
                               traker_inverse_rescale=self.traker_inverse_rescale)
        # rank 0 created this file (begin_features) before it broadcast "go"
        partial = self.store.features_partial(model_id)
        sharding.stream_solve(lambda a, b: read_rows(grads, a, b),
                              lambda a, values: write_rows(partial, a, values), mine,
                              inverse.astype(np.float32), self._chunk(k), self.mesh)
        sharding.barrier()  # every rank's rows are written (and fsynced)
        if jax.process_index() == 0:
            self.store.publish_features(model_id)

    def _chunk(self, k: int, checkpoints: int = 1) -> int:
        """Rows per streamed chunk of ``checkpoints`` float32 arrays of width k."""
        if self.chunk_rows is not None:
            return self.chunk_rows
        return max(256, _CHUNK_BYTES // (4 * k * checkpoints))

    def _missing_rows(self, done_path, n: int) -> tuple[list[int], int]:
        """(first few missing rows, how many) of a done bitmap, read in chunks."""
        if not done_path.exists():
            return list(range(min(n, 8))), n
        first, count = [], 0
        for start in range(0, n, _DONE_CHUNK):
            todo = np.flatnonzero(read_rows(done_path, start, start + _DONE_CHUNK) == 0)
            count += todo.size
            first.extend((todo[: 8 - len(first)] + start).tolist())
        return first, count

    def _stored_proj_dim(self) -> int:
        return self.proj_dim

    def train_features(self, model_id: int) -> np.ndarray:
        """The projected training gradients φ of a checkpoint, ``(train_set_size, k) f32``
        (a copy; rows not featurized are zero). Before finalize_features only."""
        return np.array(self.store.model_arrays(model_id, self.train_set_size, self.proj_dim,
                                                mode="r")["grads"])

    def target_features(self, exp_name: str, model_id: int) -> np.ndarray:
        """The projected target gradients of experiment ``exp_name`` under a checkpoint,
        ``(num_targets, k) f32`` (a copy; rows not scored are zero)."""
        return np.array(self._target_arrays(exp_name, model_id)["grads"])

    def targets_done(self, exp_name: str, model_id: int) -> bool:
        """Whether every target of ``exp_name`` is scored under checkpoint ``model_id``
        (False when the experiment or the checkpoint is not started)."""
        exp = self.store.experiment_meta(exp_name)
        if exp is None or model_id not in exp["model_ids"]:
            return False
        return bool(np.all(self._target_arrays(exp_name, model_id)["done"]))

    def _target_arrays(self, exp_name: str, model_id: int):
        exp = self.store.experiment_meta(exp_name)
        if exp is None:
            raise ValueError(f"exp_name={exp_name!r} is not an experiment of this store; "
                             "call start_scoring_checkpoint first.")
        return self.store.target_arrays(exp_name, model_id, exp["num_targets"], self.proj_dim,
                                        mode="r")

    # --- scoring -------------------------------------------------------------------------
    def start_scoring_checkpoint(self, exp_name: str, checkpoint, model_id: int,
                                 num_targets: int) -> None:
        """Start featurizing the targets of experiment ``exp_name`` with one checkpoint.

        Args:
          exp_name: the experiment (a set of targets); several per store.
          checkpoint: the checkpoint featurized under ``model_id`` (checked).
          model_id: a featurized and finalized checkpoint id.
          num_targets: m, the number of target examples of the experiment.
        """
        model_id = check_model_id(model_id)
        if isinstance(num_targets, bool) or not isinstance(num_targets, (int, np.integer)) \
                or num_targets < 1:
            raise ValueError(f"num_targets must be a positive integer, got {num_targets!r}.")
        meta = self.store.model_meta(model_id)
        if meta is None:
            raise ValueError(
                f"model_id={model_id} was never featurized in {str(self.save_dir)!r} "
                f"(featurized: {self.store.model_ids()}); featurize and finalize it first."
            )
        if not meta["finalized"]:
            raise ValueError(f"model_id={model_id} is not finalized; call finalize_features() "
                             "before scoring.")
        loaded = self._prepare(checkpoint, model_id)
        if loaded.fingerprint != meta["fingerprint"]:
            raise ValueError(
                f"this checkpoint differs from the one featurized as model_id={model_id} (weights "
                "fingerprint). Score with the same checkpoint you featurized."
            )
        def add_model(exp):
            if exp is None:
                exp = {"num_targets": int(num_targets), "model_ids": []}
            elif exp["num_targets"] != num_targets:
                raise ValueError(
                    f"experiment {exp_name!r} has num_targets={exp['num_targets']}, got "
                    f"{num_targets}; use a new exp_name for another target set."
                )
            if model_id not in exp["model_ids"]:
                exp = {**exp, "model_ids": sorted(exp["model_ids"] + [model_id])}
            return exp

        self.store.update_experiment_meta(exp_name, add_model)
        self._scoring = {"exp_name": exp_name, "loaded": loaded, "num_targets": int(num_targets),
                         "cursor": 0}

    def score(self, batch: Sequence, num_samples: int | None = None,
              inds: np.ndarray | None = None) -> None:
        """Project a batch of targets of the current experiment and store their rows.

        Args as in :meth:`featurize`, with rows counted among the experiment's targets.
        """
        if self._scoring is None:
            raise ValueError("no experiment is started: call start_scoring_checkpoint(exp_name, "
                             "checkpoint, model_id, num_targets) before score.")
        s = self._scoring
        loaded: _Loaded = s["loaded"]
        batch, inds = self._rows(batch, inds, num_samples, s["cursor"], s["num_targets"], "target")
        with self.store.experiment_lock(s["exp_name"], shared=True, doing="score"):
            self._check_batch(loaded, batch, inds)
            self._learn_width(loaded, batch)
            arrays = self.store.target_arrays(s["exp_name"], loaded.model_id, s["num_targets"],
                                              self.proj_dim)
            work, rows = self._todo(batch, inds, arrays["done"])
            if work is not None:
                label = f"score {s['exp_name']} model {loaded.model_id}"
                self._advance(label, arrays["done"], 0)
                phi, _ = self._featurize_targets(loaded.selected, loaded.rest, loaded.state,
                                                 loaded.key, loaded.cache,
                                                 sharding.pad_batch(
                                                     work, sharding.batch_shards(self.mesh)))
                results, flags = self._finish_rows(
                    rows, work, {"projected target gradients": np.asarray(phi)[: len(rows)]}, "target")
                (phi,) = results.values()
                self.store.write_rows(arrays, rows, {"grads": phi}, flags)
                self._advance(label, arrays["done"], len(rows))
        s["cursor"] = int(inds.max()) + 1 if inds.size else s["cursor"]

    def finalize_scores(self, exp_name: str, model_ids: Sequence[int] | None = None,
                        allow_skip: bool = False, *, top_k: int | None = None,
                        target_chunk: int = 4096):
        """Average the checkpoints' scores of ``exp_name`` and weight them by mean Q.

        Args:
          exp_name: the experiment.
          model_ids: checkpoints to use; all scored ones by default.
          allow_skip: skip (with a warning) checkpoints whose targets are incomplete,
            instead of raising.
          top_k: None for every score; an integer k to keep only the k strongest
            proponents and opponents of each target, never forming the (n, m) matrix, so
            memory is bounded by ``chunk_rows × target_chunk`` (for millions of rows).
          target_chunk: targets scored at once in top-k mode.

        Returns:
          ``(train_set_size, num_targets)`` float32 scores, also saved as
          ``experiments/<exp_name>/scores.npy``; with ``top_k``, a
          :class:`~trax_attr.sharding.TopK` of ``(num_targets, top_k)`` arrays (not saved).
        """
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(
                top_k, (int, np.integer)) or not 1 <= top_k <= self.train_set_size):
            raise ValueError(
                f"top_k must be None (all scores) or an integer in [1, train_set_size="
                f"{self.train_set_size}], got {top_k!r}.")
        if isinstance(target_chunk, bool) or not isinstance(target_chunk, (int, np.integer)) \
                or target_chunk < 1:
            raise ValueError(f"target_chunk must be a positive integer, got {target_chunk!r}.")
        with self.store.experiment_lock(exp_name, shared=False, doing="finalize_scores of"):
            return self._finalize_scores(exp_name, model_ids, allow_skip, top_k,
                                         int(target_chunk))

    def _finalize_scores(self, exp_name, model_ids, allow_skip, top_k, target_chunk):
        exp = self.store.experiment_meta(exp_name)
        if exp is None:
            raise ValueError(
                f"experiment {exp_name!r} does not exist in {str(self.save_dir)!r} (existing: "
                f"{self.store.experiment_names()}); call start_scoring_checkpoint first."
            )
        ids = exp["model_ids"] if model_ids is None else [check_model_id(i) for i in model_ids]
        k, n, m = self._stored_proj_dim(), self.train_set_size, exp["num_targets"]
        used = []
        for model_id in ids:
            if model_id not in exp["model_ids"]:
                raise ValueError(f"model_id={model_id} was not scored in experiment {exp_name!r} "
                                 f"(scored: {exp['model_ids']}).")
            done = self.store.target_arrays(exp_name, model_id, m, k)["done"]
            missing = np.flatnonzero(done == 0)
            if missing.size:
                message = (f"experiment {exp_name!r}, model_id={model_id} is missing {missing.size} "
                           f"of {m} targets (e.g. {missing[:8].tolist()}); score them first")
                if not allow_skip:
                    raise ValueError(message + ", or pass allow_skip=True to leave it out.")
                warnings.warn(message + "; leaving this checkpoint out.", stacklevel=2)
                continue
            used.append(model_id)
        if not used:
            raise ValueError(f"experiment {exp_name!r} has no checkpoint with all targets scored.")
        targets = np.stack([np.asarray(self.store.target_arrays(exp_name, model_id, m, k,
                                                                mode="r")["grads"])
                            for model_id in used])
        for model_id in used:
            # verified against the size and digest recorded by finalize_features
            self.store.features(model_id, n, k)
            self.store.out_to_loss(model_id, n)
        features = [self.store.array_path(model_id, "features") for model_id in used]
        out_to_loss = [self.store.array_path(model_id, "out_to_loss") for model_id in used]

        def read_features(start, stop):
            return np.stack([read_rows(path, start, stop) for path in features])

        def read_weights(start, stop):
            total = sum(read_rows(path, start, stop).astype(np.float64) for path in out_to_loss)
            return (total / len(used) ** 2).astype(np.float32)

        result = sharding.stream_scores(read_features, read_weights, targets, n,
                                        self._chunk(k, len(used)), self.mesh, top_k=top_k,
                                        target_chunk=target_chunk)
        if top_k is None:
            self.store.save_scores(exp_name, result, used)
        return result
