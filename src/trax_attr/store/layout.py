"""Names and paths of the store: validated names, and nothing outside save_dir.

Layout under ``save_dir`` (format version 2)::

    store.json                          settings, their keys and digest; learnt widths
    locks/                              flock(2) lock files (no content)
    models/<model_id>/meta.json         fingerprint, settings (digest and values), finalize
                                        records (size + xxh3_128 of every finished file)
    models/<model_id>/grads.npy         (n_train, k) f32  projected gradients Φ
    models/<model_id>/out_to_loss.npy   (n_train,)   f32  Q
    models/<model_id>/check.npy         (n_train,)   u8   a check of each row's Φ and Q,
                                                          written with them (checksums.row_checks)
    models/<model_id>/done.npy          (n_train,)   u1   0 to do, 1 done, 2 done as a zero
                                                          row (non-finite values, see TRAKer)
    models/<model_id>/xtx.npy           (k, k)           ΦᵀΦ, after finalize_features
    models/<model_id>/inverse.npy       (k, k)       f32  (ΦᵀΦ + λI)⁻¹ for the recorded λ
    experiments/<name>/meta.json        num_targets, model ids scored, settings, records
                                        of the target arrays and of the scores
    experiments/<name>/<model_id>_targets.npy  (n_targets, k) f32  φ of the targets
    experiments/<name>/<model_id>_check.npy    (n_targets,)   u8   as check.npy
    experiments/<name>/<model_id>_done.npy     (n_targets,)   u1   as done.npy
    experiments/<name>/scores.npy       (n_train, n_targets) f32, after finalize_scores
"""

from __future__ import annotations

import re

from ..settings import MAX_MODEL_ID, check_int

__all__ = ["FORMAT_VERSION", "check_name", "check_model_id", "model_id_of"]

FORMAT_VERSION = 2
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_ID = re.compile(r"[0-9]{1,10}")


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"{kind}={name!r} is not a valid name: use 1 to 128 letters, digits, '_', '-' and "
            "'.', starting with a letter or digit and without '..' (it becomes a folder inside "
            "save_dir)."
        )
    return name


def check_model_id(model_id) -> int:
    return check_int("model_id", model_id, high=MAX_MODEL_ID, fix="number checkpoints 0, 1, 2, ...")


def model_id_of(folder_name: str) -> int | None:
    """The model id a folder of ``models/`` is named after, or None for any other name
    (``"007"``, ``"٣"``, ``"-1"`` are not ids: ``models/<id>`` is always ``str(id)``)."""
    if not _ID.fullmatch(folder_name) or str(int(folder_name)) != folder_name:
        return None
    model_id = int(folder_name)
    return model_id if model_id <= MAX_MODEL_ID else None
