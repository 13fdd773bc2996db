"""Names and paths of the store: validated names, and nothing outside save_dir.

Layout under ``save_dir`` (format version 2)::

    store.json                          settings (and their digest), written once
    locks/                              flock(2) lock files (no content)
    models/<model_id>/meta.json         fingerprint, settings digest, finalize record
    models/<model_id>/grads.npy         (n_train, k) f32  projected gradients Φ
    models/<model_id>/out_to_loss.npy   (n_train,)   f32  Q
    models/<model_id>/done.npy          (n_train,)   u1   0 to do, 1 done, 2 done as a zero
                                                          row (non-finite values, see TRAKer)
    models/<model_id>/xtx.npy           (k, k)           ΦᵀΦ, after finalize_features
    models/<model_id>/inverse.npy       (k, k)       f32  (ΦᵀΦ + λI)⁻¹ for the recorded λ
    experiments/<name>/meta.json        num_targets, model ids scored, scores record
    experiments/<name>/<model_id>_targets.npy  (n_targets, k) f32  φ of the targets
    experiments/<name>/<model_id>_done.npy     (n_targets,)   u1   as done.npy
    experiments/<name>/scores.npy       (n_train, n_targets) f32, after finalize_scores
"""

from __future__ import annotations

import re

import numpy as np

__all__ = ["FORMAT_VERSION", "check_name", "check_model_id"]

FORMAT_VERSION = 2
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"{kind}={name!r} is not a valid name: use 1 to 128 letters, digits, '_', '-' and "
            "'.', starting with a letter or digit and without '..' (it becomes a folder inside "
            "save_dir)."
        )
    return name


def check_model_id(model_id) -> int:
    if isinstance(model_id, bool) or not isinstance(model_id, (int, np.integer)) or model_id < 0:
        raise ValueError(f"model_id must be a non-negative integer, got {model_id!r}; number "
                         "checkpoints 0, 1, 2, ...")
    return int(model_id)
