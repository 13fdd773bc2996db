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

from .features import Featurizer, featurize_fn, inverse_gram
from .gradients import GradWrt, Selection, select
from .models import Model, as_model
from .projection import Projector, get_projector, projection_cache, projection_key
from .store import Store, check_model_id
from .tasks import ModelOutput, get_task

__all__ = ["TRAKer"]

logger = logging.getLogger(__name__)


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
        ``apply_fn(params, *inputs)``, or a :class:`trax_attr.Model`.
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
      progress: show a tqdm progress bar (rows and rows/s) per checkpoint while
        featurizing and scoring; off by default.
    """

    def __init__(self, model, task: str | ModelOutput = "image_classification",
                 train_set_size: int | None = None, save_dir: str = "./trak_results", *,
                 proj_dim: int = 2048, projector: str | Projector = "rademacher", seed: int = 0,
                 lambda_reg: float = 0.0, grad_wrt: GradWrt = None, proj_dtype=jnp.bfloat16,
                 xtx_dtype=np.float32, traker_inverse_rescale: bool = False,
                 chunk_rows: int = 16384, progress: bool = False):
        if (isinstance(train_set_size, bool) or not isinstance(train_set_size, (int, np.integer))
                or train_set_size < 1):
            raise ValueError(
                f"train_set_size must be a positive integer (the number of training "
                f"examples), got {train_set_size!r}."
            )
        if not isinstance(lambda_reg, (int, float, np.floating)) or not (
                math.isfinite(lambda_reg) and lambda_reg >= 0):
            raise ValueError(f"lambda_reg must be a finite number >= 0, got {lambda_reg!r}.")
        if np.dtype(xtx_dtype) not in (np.float32, np.float64):
            raise ValueError(f"xtx_dtype must be np.float32 or np.float64, got {xtx_dtype!r}.")
        if not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 1:
            raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}.")
        self.model: Model = as_model(model)
        self.task: ModelOutput = get_task(task)
        self.projector: Projector = get_projector(projector, proj_dim, proj_dtype)
        self.train_set_size = int(train_set_size)
        self.seed = int(seed)
        self.lambda_reg = float(lambda_reg)
        self.grad_wrt = grad_wrt
        self.xtx_dtype = np.dtype(xtx_dtype)
        self.traker_inverse_rescale = bool(traker_inverse_rescale)
        self.chunk_rows = int(chunk_rows)
        self.store = Store(save_dir, {
            "train_set_size": self.train_set_size,
            "task": repr(self.task),
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
        self._width = None  # k; structured projectors learn it from the first batch
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
        """k, the width of the stored features."""
        if self._width is None:
            self._width = self.projector.output_dim(self.grad_dim)
        return self._width

    def _learn_width(self, loaded, batch) -> None:
        """Structured projectors' k depends on the model's layers: trace one batch."""
        if self._width is None and self.projector.kind == "kronecker":
            phi, _ = jax.eval_shape(self._featurize_targets, loaded.selected, loaded.rest,
                                    loaded.state, loaded.key, loaded.cache,
                                    tuple(jnp.asarray(a) for a in batch))
            self._width = int(phi.shape[1])

    def _prepare(self, checkpoint, model_id: int) -> _Loaded:
        params, state = self.model.split(checkpoint)
        if self._selection is None:
            self._selection = select(params, self.grad_wrt)
            f = Featurizer(self.task, self.model, self._selection, self.projector)
            self._featurize = jax.jit(featurize_fn(f))
            self._featurize_targets = jax.jit(featurize_fn(f, with_out_to_loss=False))
            self.store.check_config({"grad_dim": self._selection.grad_dim,
                                     "parameters": list(self._selection.paths)})
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
        meta = self.store.model_meta(model_id)
        if meta is not None and meta["fingerprint"] != loaded.fingerprint:
            raise ValueError(
                f"model_id={model_id} in {str(self.save_dir)!r} holds features of a different "
                "checkpoint (its weights' fingerprint differs). Give this checkpoint a new "
                "model_id, or use another save_dir."
            )
        if meta is None:
            self.store.write_model_meta(model_id, {"fingerprint": loaded.fingerprint,
                                                   "finalized": False})
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
            inds = np.asarray(inds)
            if not np.issubdtype(inds.dtype, np.integer) or inds.shape != (size,):
                raise ValueError(
                    f"inds must be {size} integers, one per example of the batch; got "
                    f"{inds.dtype}{list(inds.shape)}."
                )
        if inds.size and (inds.min() < 0 or inds.max() >= limit):
            raise ValueError(
                f"{what} rows {inds.min()}..{inds.max()} are out of range [0, {limit}); check "
                "inds or the batches' total against the size given when the store was set up."
            )
        unique, counts = np.unique(inds, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"inds holds duplicates {unique[counts > 1][:8].tolist()}; each row "
                             "of a batch must be a different example.")
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

    @staticmethod
    def _check_finite(values: np.ndarray, inds: np.ndarray, what: str) -> None:
        bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
        if bad.any():
            raise FloatingPointError(
                f"{what} of examples {inds[bad][:8].tolist()} ({int(bad.sum())} in this batch) "
                "are NaN or Inf; nothing of this batch was written. Check those inputs and the "
                "model's outputs on them."
            )

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
        meta = self.store.model_meta(loaded.model_id)
        if meta.get("finalized"):
            raise ValueError(
                f"model_id={loaded.model_id} is already finalized; its features are fixed. "
                "Featurize new checkpoints under a new model_id (or use another save_dir)."
            )
        batch, inds = self._rows(batch, inds, num_samples, self._train_cursor,
                                 self.train_set_size, "training")
        self._train_cursor = int(inds.max()) + 1 if inds.size else self._train_cursor
        self._learn_width(loaded, batch)
        arrays = self.store.model_arrays(loaded.model_id, self.train_set_size, self.proj_dim)
        work, rows = self._todo(batch, inds, arrays["done"])
        if work is None:
            return
        self._advance(f"featurize model {loaded.model_id}", arrays["done"], 0)
        phi, q = self._featurize(loaded.selected, loaded.rest, loaded.state, loaded.key,
                                 loaded.cache, tuple(jnp.asarray(a) for a in work))
        phi, q = np.asarray(phi)[: len(rows)], np.asarray(q)[: len(rows)]
        self._check_finite(phi, rows, "projected gradients")
        self._check_finite(q, rows, "out-to-loss gradients")
        arrays["grads"][rows] = phi
        arrays["out_to_loss"][rows] = q
        arrays["grads"].flush()
        arrays["out_to_loss"].flush()
        arrays["done"][rows] = 1
        arrays["done"].flush()
        self._advance(f"featurize model {loaded.model_id}", arrays["done"], len(rows))

    def _advance(self, label: str, done: np.ndarray, count: int) -> None:
        """Move the progress bar of ``label`` by ``count`` newly stored rows (0 before a
        batch's work, so that the rate counts from the first batch)."""
        if not self.progress:
            return
        if self._bar_label != label:
            if self._bar is not None:
                self._bar.close()
            from tqdm.auto import tqdm  # only when asked for

            self._bar = tqdm(total=len(done), initial=int(done.sum()) - count, desc=label,
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
        """
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
            if meta.get("finalized"):
                continue
            arrays = self.store.model_arrays(model_id, n, k)
            missing = np.flatnonzero(arrays["done"] == 0)
            if missing.size:
                raise ValueError(
                    f"model_id={model_id} is missing {missing.size} of {n} training rows (e.g. "
                    f"{missing[:8].tolist()}); featurize them before finalize_features."
                )
            grads = arrays["grads"]
            gram = np.zeros((k, k), self.xtx_dtype)
            for start in range(0, n, self.chunk_rows):
                block = np.asarray(grads[start:start + self.chunk_rows], self.xtx_dtype)
                gram += block.T @ block
            inverse = inverse_gram(gram, self.lambda_reg,
                                   traker_inverse_rescale=self.traker_inverse_rescale)
            inverse = inverse.astype(np.float32)
            features, publish = self.store.new_features(model_id, n, k)
            for start in range(0, n, self.chunk_rows):
                features[start:start + self.chunk_rows] = grads[start:start + self.chunk_rows] @ inverse
            publish()
            self.store.write_model_meta(model_id, {**meta, "finalized": True})
            logger.info("finalized features of model_id=%d (n=%d, k=%d)", model_id, n, k)

    def _stored_proj_dim(self) -> int:
        if self._selection is not None:
            return self.proj_dim
        grad_dim = self.store.config.get("grad_dim")
        if grad_dim is None:
            raise ValueError("the store holds no features yet; call load_checkpoint first.")
        return self.projector.output_dim(grad_dim)

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
        if not meta.get("finalized"):
            raise ValueError(f"model_id={model_id} is not finalized; call finalize_features() "
                             "before scoring.")
        loaded = self._prepare(checkpoint, model_id)
        if loaded.fingerprint != meta["fingerprint"]:
            raise ValueError(
                f"this checkpoint differs from the one featurized as model_id={model_id} (weights "
                "fingerprint). Score with the same checkpoint you featurized."
            )
        exp = self.store.experiment_meta(exp_name)
        if exp is None:
            exp = {"num_targets": int(num_targets), "model_ids": []}
        elif exp["num_targets"] != num_targets:
            raise ValueError(
                f"experiment {exp_name!r} has num_targets={exp['num_targets']}, got "
                f"{num_targets}; use a new exp_name for another target set."
            )
        if model_id not in exp["model_ids"]:
            exp["model_ids"] = sorted(exp["model_ids"] + [model_id])
        self.store.write_experiment_meta(exp_name, exp)
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
        s["cursor"] = int(inds.max()) + 1 if inds.size else s["cursor"]
        self._learn_width(loaded, batch)
        arrays = self.store.target_arrays(s["exp_name"], loaded.model_id, s["num_targets"],
                                          self.proj_dim)
        work, rows = self._todo(batch, inds, arrays["done"])
        if work is None:
            return
        self._advance(f"score {s['exp_name']} model {loaded.model_id}", arrays["done"], 0)
        phi, _ = self._featurize_targets(loaded.selected, loaded.rest, loaded.state, loaded.key,
                                         loaded.cache, tuple(jnp.asarray(a) for a in work))
        phi = np.asarray(phi)[: len(rows)]
        self._check_finite(phi, rows, "projected target gradients")
        arrays["grads"][rows] = phi
        arrays["grads"].flush()
        arrays["done"][rows] = 1
        arrays["done"].flush()
        self._advance(f"score {s['exp_name']} model {loaded.model_id}", arrays["done"], len(rows))

    def finalize_scores(self, exp_name: str, model_ids: Sequence[int] | None = None,
                        allow_skip: bool = False) -> np.ndarray:
        """Average the checkpoints' scores of ``exp_name`` and weight them by mean Q.

        Args:
          exp_name: the experiment.
          model_ids: checkpoints to use; all scored ones by default.
          allow_skip: skip (with a warning) checkpoints whose targets are incomplete,
            instead of raising.

        Returns:
          ``(train_set_size, num_targets)`` float32 scores, also saved as
          ``experiments/<exp_name>/scores.npy``.
        """
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
            missing = np.flatnonzero(self.store.target_arrays(exp_name, model_id, m, k)["done"] == 0)
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
        scores = np.zeros((n, m), np.float32)
        out_to_loss = np.zeros(n, np.float64)
        for model_id in used:
            targets = np.asarray(self.store.target_arrays(exp_name, model_id, m, k)["grads"])
            features = self.store.features(model_id, n, k)
            for start in range(0, n, self.chunk_rows):
                scores[start:start + self.chunk_rows] += features[start:start + self.chunk_rows] @ targets.T
            out_to_loss += self.store.model_arrays(model_id, n, k)["out_to_loss"]
        scores *= (out_to_loss / len(used) ** 2).astype(np.float32)[:, None]
        self.store.save_scores(exp_name, scores)
        return scores
