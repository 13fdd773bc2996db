"""TRAKer: the familiar stateful shell over the functional core and the on-disk store.

The workflow is traker's::

    traker = TRAKer(model=model, task="image_classification", train_set_size=n,
                    save_dir="./trak_results", proj_dim=2048)
    for model_id, checkpoint in enumerate(checkpoints):
        traker.load_checkpoint(checkpoint, model_id=model_id)
        for batch in train_batches:
            traker.featurize(batch=batch, num_samples=len(batch[0]))
    traker.finalize_features()                            # λ = "auto" by default
    for model_id, checkpoint in enumerate(checkpoints):
        traker.start_scoring_checkpoint(exp_name="test", checkpoint=checkpoint,
                                        model_id=model_id, num_targets=m)
        for batch in target_batches:
            traker.score(batch=batch, num_samples=len(batch[0]))
    scores = traker.finalize_scores(exp_name="test")      # (n, m) float32

It holds cursors, the loaded checkpoint and progress bars; kernels, finalize steps and files
are in trax_attr.parallel, .pipeline and .store. Steps resume: rows on disk are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from . import batches, parallel, pipeline
from .engine import Checkpoint, Featurizer, Resident, host_features, prepare
from .engine.linalg import AUTO, check_lambda
from .gradients import GradWrt, select
from .hashing import fingerprint
from .models import as_model
from .projection import get_projector
from .settings import (MAX_MODEL_ID, Settings, check_int, check_model_ids, learned_config,
                       refuse_unknown)
from .store import KeptRows, open_store
from .tasks import ModelOutput, get_task

__all__ = ["TRAKer"]

class _Loaded(NamedTuple):
    """A checkpoint ready to featurize or score."""

    model_id: int
    checkpoint: Checkpoint
    fingerprint: str


class TRAKer:
    """Attribute a model's outputs on targets to its training examples with TRAK.

    Args:
      model: a ``flax.nnx.Module``, a ``flax.linen.Module``, a function
        ``apply_fn(params, *inputs)``, a ``torch.nn.Module`` (needs the ``interop``
        extra; checkpoints are state_dicts or paths to them), or a
        :class:`trax_attr.Model`.
      task: a task name (``"image_classification"``), or a :class:`ModelOutput`.
      train_set_size: n, the number of training examples.
      save_dir: folder of the store, or a URL (``s3://bucket/prefix``, ``gs://...``, see
        docs/scaling.md); an existing store is resumed if its settings match.
      proj_dim: k, the projected dimension (ignored by the identity projector).
      projector: ``"rademacher"``, ``"normal"``, ``"identity"`` or a projector such as
        ``trax_attr.rademacher(2048)`` or ``trax_attr.kronecker(16, 16)``.
      seed: seed of the projection, in [0, 2**32); checkpoint m uses fold_in(key(seed), m).
      lambda_reg: the default λ of :meth:`finalize_features`: ``"auto"`` (chosen from each
        checkpoint's XᵀX, see the README) or a number ≥ 0. Not a store setting.
      grad_wrt: which parameters to differentiate (see :func:`trax_attr.select`).
      proj_dtype: compute dtype of the projection matmul (bfloat16: fast; float32: exact).
      xtx_dtype: accumulation dtype of XᵀX, ``np.float32`` or ``np.float64``.
      traker_inverse_rescale: divide each (XᵀX + λI)⁻¹ by its mean absolute entry, as
        traker 0.3.2 does (for score parity with it; off by default).
      chunk_rows: rows of the store read at once by finalize steps; bounds memory.
        ``None`` (default): as many rows as fit in 8 MiB of float32 features, at least 256.
      nonfinite: examples whose inputs, outputs or gradients hold NaN or Inf: ``"raise"``
        (a :class:`NonFiniteError` naming them; nothing of the batch is written) or
        ``"zero"`` (stored as zero rows, score 0, with a :class:`NonFiniteWarning`).
      backend: torch modules only: ``"converted"`` (default; the module as a JAX
        function) or ``"torch"`` (per-example gradients in torch with torch.func).
      progress: a tqdm progress bar per checkpoint while featurizing and scoring.
      mesh: the ``jax.sharding.Mesh`` of this process's devices that batches, XᵀX and
        scores are split over (see :mod:`trax_attr.parallel`); None: all local devices.
        Several processes (jax.distributed) share one store: each featurizes its own
        rows (``inds=``), all call finalize_features.
    """

    def __init__(self, model, task: str | ModelOutput = "image_classification",
                 train_set_size: int | None = None, save_dir: str = "./trak_results", *,
                 proj_dim: int = 2048, projector="rademacher", seed: int = 0,
                 lambda_reg=AUTO, grad_wrt: GradWrt = None, proj_dtype=jnp.bfloat16,
                 xtx_dtype=np.float32, traker_inverse_rescale: bool = False,
                 chunk_rows: int | None = None, nonfinite: str = "raise", mesh=None,
                 backend: str | None = None, progress: bool = False, **unknown):
        refuse_unknown(unknown)
        self.model = as_model(model, backend=backend)
        self.task: ModelOutput = get_task(task)
        self.projector = get_projector(projector, proj_dim, proj_dtype)
        self.settings = Settings.create(
            train_set_size=train_set_size, task=self.task, projector=self.projector,
            seed=seed, grad_wrt=grad_wrt, xtx_dtype=xtx_dtype)
        self.train_set_size = self.settings.train_set_size
        self.seed = self.settings.seed
        self.grad_wrt = grad_wrt
        self.lambda_reg = check_lambda(lambda_reg)
        self.traker_inverse_rescale = bool(traker_inverse_rescale)
        self.chunk_rows = None if chunk_rows is None else check_int(
            "chunk_rows", chunk_rows, low=1, or_none="sized from proj_dim")
        self.nonfinite = batches.check_nonfinite_mode(nonfinite)
        self.mesh = parallel.check_mesh(mesh)
        self.store = open_store(save_dir, self.settings.to_config())
        self.save_dir = self.store.root
        self._progress = batches.Progress(progress)
        self._featurizer: Featurizer | None = None
        self._loaded: _Loaded | None = None
        self._train_cursor = 0
        self._scoring: dict[str, Any] | None = None
        self._shapes: dict = {}
        self._resident = Resident()  # batch sizes compiled; the last checkpoint's P
        self._rows = KeptRows()  # the row arrays of the last batch, kept open

    # --- checkpoints ---------------------------------------------------------------------
    @property
    def grad_dim(self) -> int:
        """d, the number of differentiated parameters (known after load_checkpoint)."""
        if self._featurizer is None:
            raise ValueError("grad_dim is known after the first load_checkpoint call.")
        return self._featurizer.selection.grad_dim

    @property
    def proj_dim(self) -> int:
        """k, the width of the stored features: known after load_checkpoint (after the
        first batch for projectors that trace the model), or from a reopened store."""
        width = self.store.config.get("feature_dim")
        if width is not None:
            return int(width)
        if self._featurizer is None:
            raise ValueError("proj_dim is known after the first load_checkpoint call (the "
                             "store holds no features yet).")
        return self.projector.output_dim(self.projector.layer_info(
            self._featurizer, None, None))

    def _prepare(self, checkpoint, model_id: int) -> _Loaded:
        params, state = self.model.split(checkpoint)
        batches.check_finite_weights(params, state, model_id)
        selection = select(params, self.grad_wrt)
        if self._featurizer is None:
            self._featurizer = Featurizer(self.task, self.model, selection, self.projector)
            parallel.proj_columns(self._featurizer, self.mesh)  # refuse a bad mesh now
            self.store.check_config(learned_config(selection, params, self.projector))
        else:
            self._featurizer.selection.check_same(selection)
        ckpt = prepare(self._featurizer, params, state, self.seed, model_id, cache=False)
        return _Loaded(model_id, ckpt, fingerprint(params, state))

    def load_checkpoint(self, checkpoint, model_id: int) -> None:
        """Make ``checkpoint`` the one featurized next, under ``model_id``.

        Args:
          checkpoint: a params pytree (plain function), a variables dict (linen), an
            nnx Module or State (nnx, None for the module's own weights), a torch
            state_dict or a path to one.
          model_id: a non-negative integer naming the checkpoint in the store.
        """
        model_id = check_int("model_id", model_id, high=MAX_MODEL_ID,
                             fix="number checkpoints 0, 1, 2, ...")
        loaded = self._prepare(checkpoint, model_id)
        meta = self.store.create_model(model_id, loaded.fingerprint)
        if meta["fingerprint"] != loaded.fingerprint:
            raise ValueError(
                f"model_id={model_id} in {str(self.save_dir)!r} holds features of a different "
                "checkpoint (its weights' fingerprint differs). Give this checkpoint a new "
                "model_id, or use another save_dir.")
        self._loaded, self._train_cursor = loaded, 0

    def finalized(self, model_id: int) -> bool:
        """Whether ``model_id``'s features are finalized (a resumed script skips it)."""
        meta = self.store.model_meta(check_int("model_id", model_id, high=MAX_MODEL_ID))
        return bool(meta and meta["finalized"])

    # --- batches -------------------------------------------------------------------------
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
        if self._loaded is None:
            raise ValueError("no checkpoint is loaded: call load_checkpoint(checkpoint, "
                             "model_id) before featurize.")
        loaded, batch = self._loaded, batches.as_batch(batch)
        inds = batches.batch_rows(batch, inds, num_samples, self._train_cursor,
                                  self.train_set_size, "training")
        with self.store.model_lock(loaded.model_id, shared=True, doing="featurize"):
            if self.store.model_meta(loaded.model_id)["finalized"]:
                raise ValueError(
                    f"model_id={loaded.model_id} is already finalized; its features are "
                    "fixed. Featurize new checkpoints under a new model_id (or use another "
                    "save_dir); a resumed script can skip checkpoints where "
                    "traker.finalized(model_id).")
            self._check_batch(loaded, batch, inds)
            arrays = self._rows.get(("train", loaded.model_id), lambda: self.store.model_arrays(
                loaded.model_id, self.train_set_size, self.proj_dim))
            batches.write_batch(
                self.store, arrays, batch, inds, lambda work: self._features(loaded, work),
                {"grads": "projected gradients",
                 "out_to_loss": "out-to-loss values (from the model outputs)"},
                kind="training", mode=self.nonfinite, progress=self._progress,
                label=f"featurize model {loaded.model_id}")
        # only a batch on disk moves the cursor: a failed call can be repeated as is
        self._train_cursor = int(inds.max()) + 1 if inds.size else self._train_cursor

    def _check_batch(self, loaded: _Loaded, batch: tuple, inds: np.ndarray) -> None:
        """The task's checks of the batch, and the width of features learnt from it."""
        ckpt = loaded.checkpoint
        params = self._featurizer.selection.merge(ckpt.selected, ckpt.rest)
        batches.check_batch(self.task, self.model.apply, params, ckpt.state, batch, inds,
                            self._shapes, traced=self.model.host_grads is None)
        if "feature_dim" not in self.store.config:  # a projector that traces the model
            info = self.projector.layer_info(self._featurizer, ckpt, batch)
            self.store.check_config({"feature_dim": self.projector.output_dim(info)})

    def _features(self, loaded: _Loaded, work: tuple) -> dict[str, Any]:
        padded = parallel.pad_batch(work, self._resident.pad_size(
            len(work[0]), parallel.batch_shards(self.mesh)))
        ckpt = self._resident.checkpoint(self._featurizer, loaded.checkpoint, loaded.model_id)
        if self.model.host_grads is None:
            phi, q = parallel.featurize(self._featurizer, self.mesh, ckpt, padded)
        else:  # gradients from the host (torch); only their projection is jitted
            phi, q = host_features(self._featurizer, ckpt, padded)
        return {"grads": phi, "out_to_loss": q}

    # --- finalize features ---------------------------------------------------------------
    def finalize_features(self, model_ids: Sequence[int] | None = None, *,
                          lambda_reg=None, solve: str = "auto") -> None:
        """Factorise XᵀX + λI for each featurized checkpoint.

        Args:
          model_ids: the checkpoints to finalize; all featurized ones by default.
          lambda_reg: λ for these checkpoints: ``"auto"`` or a number ≥ 0; None: the
            TRAKer's ``lambda_reg``. Finalized checkpoints with the same λ are kept as
            they are; another λ costs one factorisation of the stored XᵀX, not a pass
            over the features, and each checkpoint records the λ it holds.
          solve: ``"host"`` (float64 Cholesky on the host, k x k float64 in host memory),
            ``"sharded"`` (XᵀX and its inverse split by rows over every device of every
            process, float32 unless jax_enable_x64; for large proj_dim, see
            docs/scaling.md) or ``"auto"``: host while it needs at most 8 GiB
            (:func:`trax_attr.engine.choose_solve`; k ≤ 14,654).

        The store is streamed in ``chunk_rows`` chunks. With several processes every one of
        them calls this: each sums XᵀX over its :func:`~trax_attr.parallel.process_rows`,
        the sums are gathered, and process 0 writes.
        """
        lambda_reg = self.lambda_reg if lambda_reg is None else check_lambda(lambda_reg)
        ids = check_model_ids(model_ids, self.store.model_ids())
        if not ids:
            raise ValueError("nothing to finalize: no checkpoint has been featurized in "
                             f"{str(self.save_dir)!r}. Call load_checkpoint and featurize first.")
        k = self.proj_dim
        pipeline.finalize_features(
            self.store, ids, n=self.train_set_size, k=k, lambda_reg=lambda_reg,
            rescale=self.traker_inverse_rescale, xtx_dtype=np.dtype(self.settings.xtx_dtype),
            chunk=pipeline.chunk_rows(k, 1, self.chunk_rows), mesh=self.mesh, solve=solve)

    def lambdas(self) -> dict[int, dict]:
        """The λ each finalized checkpoint holds: ``{model_id: {"lambda_reg": request,
        "value": λ, "traker_inverse_rescale": bool}}``."""
        return {i: meta["lambda"] for i in self.store.model_ids()
                if (meta := self.store.model_meta(i))["finalized"]}

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
        model_id = check_int("model_id", model_id, high=MAX_MODEL_ID)
        num_targets = check_int("num_targets", num_targets, low=1,
                                fix="the number of target examples.")
        meta = self.store.model_meta(model_id)
        if meta is None:
            raise ValueError(
                f"model_id={model_id} was never featurized in {str(self.save_dir)!r} "
                f"(featurized: {self.store.model_ids()}); featurize and finalize it first.")
        if not meta["finalized"]:
            raise ValueError(f"model_id={model_id} is not finalized; call finalize_features() "
                             "before scoring.")
        loaded = self._prepare(checkpoint, model_id)
        if loaded.fingerprint != meta["fingerprint"]:
            raise ValueError(
                f"this checkpoint differs from the one featurized as model_id={model_id} "
                "(weights fingerprint). Score with the same checkpoint you featurized.")

        self.store.add_to_experiment(exp_name, model_id, num_targets)
        self._scoring = {"exp_name": exp_name, "loaded": loaded, "num_targets": num_targets,
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
        loaded, exp = s["loaded"], s["exp_name"]
        batch = batches.as_batch(batch)
        inds = batches.batch_rows(batch, inds, num_samples, s["cursor"], s["num_targets"],
                                  "target")
        with self.store.experiment_lock(exp, shared=True, doing="score"):
            self._check_batch(loaded, batch, inds)
            arrays = self._rows.get((exp, loaded.model_id, s["num_targets"]), lambda: (
                self.store.target_arrays(exp, loaded.model_id, s["num_targets"], self.proj_dim)))
            batches.write_batch(
                self.store, arrays, batch, inds, lambda work: self._features(loaded, work),
                {"grads": "projected target gradients"}, kind="target", mode=self.nonfinite,
                progress=self._progress, label=f"score {exp} model {loaded.model_id}")
        s["cursor"] = int(inds.max()) + 1 if inds.size else s["cursor"]

    def finalize_scores(self, exp_name: str, model_ids: Sequence[int] | None = None,
                        allow_skip: bool = False, *, top_k: int | None = None,
                        target_chunk: int = 4096):
        """Average the checkpoints' scores of ``exp_name`` and weight them by mean Q.

        Args:
          exp_name: the experiment.
          model_ids: checkpoints to use; all scored ones by default. They must hold one λ
            (see :meth:`finalize_features`); the scores record it.
          allow_skip: skip (with a warning) checkpoints whose targets are incomplete,
            instead of raising.
          top_k: None for every score; an integer k to keep only the k strongest
            proponents and opponents of each target, never forming the (n, m) matrix, so
            memory is bounded by ``chunk_rows × target_chunk`` (for millions of rows).
          target_chunk: targets scored at once in top-k mode.

        Returns:
          ``(train_set_size, num_targets)`` float32 scores, also saved as
          ``experiments/<exp_name>/scores.npy``; with ``top_k``, a
          :class:`~trax_attr.TopK` of ``(num_targets, top_k)`` arrays (not saved).
          With several processes every one calls this and scores its own rows; all get
          the whole result, process 0 saves it.
        """
        if top_k is not None:
            top_k = check_int("top_k", top_k, low=1, high=self.train_set_size,
                              fix="or None for all scores.")
        target_chunk = check_int("target_chunk", target_chunk, low=1)
        ids = None if model_ids is None else check_model_ids(model_ids, ())
        k = self.proj_dim
        count = len(ids) if ids is not None else max(1, len(self.store.model_ids()))
        with pipeline.scores_lock(self.store, exp_name):
            return pipeline.finalize_scores(
                self.store, exp_name, ids, allow_skip=bool(allow_skip), n=self.train_set_size,
                k=k, chunk=pipeline.chunk_rows(k, count, self.chunk_rows), mesh=self.mesh,
                top_k=top_k, target_chunk=target_chunk)

    # --- what the store holds ------------------------------------------------------------
    def zeroed_rows(self, model_id: int, exp_name: str | None = None) -> np.ndarray:
        """Rows stored as zeros because of NaN or Inf (``nonfinite="zero"``), ``(r,) int64``.

        Args:
          model_id: the checkpoint.
          exp_name: None for training rows, else the experiment whose target rows to list.
        """
        done = self.store.rows_done(check_int("model_id", model_id, high=MAX_MODEL_ID),
                                    exp_name)
        return np.flatnonzero(done == 2).astype(np.int64)

    def train_features(self, model_id: int) -> np.ndarray:
        """The projected training gradients φ of a checkpoint, ``(train_set_size, k) f32``
        (a copy; rows not featurized are zero)."""
        return np.array(self.store.model_arrays(model_id, self.train_set_size, self.proj_dim,
                                                mode="r")["grads"])

    def target_features(self, exp_name: str, model_id: int) -> np.ndarray:
        """The projected target gradients of experiment ``exp_name`` under a checkpoint,
        ``(num_targets, k) f32`` (a copy; rows not scored are zero)."""
        return np.array(self.store.experiment_rows(exp_name, model_id, self.proj_dim)["grads"])

    def targets_done(self, exp_name: str, model_id: int) -> bool:
        """Whether every target of ``exp_name`` is scored under checkpoint ``model_id``
        (False when the experiment or the checkpoint is not started)."""
        exp = self.store.experiment_meta(exp_name)
        return bool(exp is not None and model_id in exp["model_ids"] and np.all(
            self.store.experiment_rows(exp_name, model_id, self.proj_dim)["done"]))
