"""What each metadata file of the store must hold, checked whenever one is read.

A JSON file that parses but holds the wrong types (an edited value, another program's
file) is refused here with :class:`~.errors.StoreCorruptedError`, naming the file, the
entry and the fix, so that no caller meets a KeyError or a TypeError deep inside.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from ..settings import MAX_MODEL_ID
from .checksums import record_digest
from .errors import StoreCorruptedError, repair_hint

__all__ = ["BOUND", "check_store_meta", "check_model_meta", "check_experiment_meta", "is_record",
           "LEARNT"]

_HEX = re.compile(r"[0-9a-f]{32}")

# what a TRAKer learns from the model and records in store.json beside the settings
LEARNT = {"feature_dim": "a positive integer", "grad_dim": "a positive integer",
          "parameters": "a list of strings", "parameter_shapes": "a list of lists of integers"}


# entries of a checkpoint's meta that describe one finished file, and that file: each is
# copied into the file's record when it is written and must still equal it when read, so
# an edited λ cannot make finalize_features keep an inverse computed with another λ
BOUND = {"lambda": "inverse.npy"}


def _bad(path: Path, entry: str, expected: str, value) -> StoreCorruptedError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return StoreCorruptedError(f"{str(path)!r} lacks {expected} {entry} (found {shown}); the "
                               "store's metadata is corrupted. " + repair_hint(path))


def _int(value, low: int = 0, high: int | None = None) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool) and value >= low
            and (high is None or value <= high))


def is_record(value) -> bool:
    """Whether ``value`` is a ``{"bytes": int, digest: hex}`` file record, the digest one
    of :data:`~trax_attr.store.checksums.DIGESTS` (xxh3_128, or blake2b from older stores)."""
    digest = record_digest(value)
    return (digest is not None and _int(value.get("bytes"))
            and isinstance(value[digest], str) and bool(_HEX.fullmatch(value[digest])))


def _records(path: Path, entry: str, meta: dict, key: str) -> None:
    if key not in meta:
        return
    value = meta[key]
    if not isinstance(value, dict) or not all(isinstance(k, str) and is_record(v)
                                              for k, v in value.items()):
        raise _bad(path, f"{entry} (file records {{\"bytes\", \"xxh3_128\"}})", "a valid", value)


def _lambda(path: Path, entry: str, value) -> None:
    request = value.get("lambda_reg") if isinstance(value, dict) else None
    ok = (isinstance(value, dict)
          and (request == "auto" or (isinstance(request, (int, float))
                                     and not isinstance(request, bool)
                                     and math.isfinite(request) and request >= 0))
          and isinstance(value.get("value"), (int, float)) and not isinstance(value["value"], bool)
          and math.isfinite(value["value"]) and value["value"] >= 0
          and isinstance(value.get("traker_inverse_rescale"), bool))
    if not ok:
        raise _bad(path, f"{entry} ({{\"lambda_reg\": \"auto\" or a number >= 0, \"value\": "
                   "a number >= 0, \"traker_inverse_rescale\": a boolean})", "a valid", value)


def _settings(path: Path, meta: dict, digest: str) -> None:
    stamp = meta.get("settings")
    if not isinstance(stamp, dict) or not isinstance(stamp.get("digest"), str):
        raise _bad(path, "'settings' (their 'digest')", "a valid", stamp)
    if stamp["digest"] != digest:
        raise StoreCorruptedError(
            f"{str(path)!r} was written with other settings (digest {stamp['digest']}) than "
            f"store.json holds (digest {digest}): store.json was replaced, edited or lost "
            "since, and these arrays would be combined with a projection they were not "
            "computed with. Restore the store.json written with them (from a backup or the "
            f"original save_dir), or delete the folder {str(path.parent)!r} to recompute it.")


def check_store_meta(path: Path, meta: dict, version: int) -> dict[str, Any]:
    """The checked contents of ``store.json``: ``{"config", "settings": {"keys",
    "digest"}}``."""
    if meta.get("format") != "trax_attr.store" or meta.get("version") != version:
        raise StoreCorruptedError(
            f"{str(path)!r} is not a trax_attr store of format version {version} (found "
            f"format={meta.get('format')!r}, version={meta.get('version')!r}). Use another "
            "save_dir.")
    config = meta.get("config")
    if not isinstance(config, dict):
        raise _bad(path, "'config'", "an object", config)
    settings = meta.get("settings")
    if (not isinstance(settings, dict) or not isinstance(settings.get("digest"), str)
            or not isinstance(settings.get("keys"), list)
            or not all(isinstance(k, str) and k in config for k in settings["keys"])):
        raise _bad(path, "'settings' ({\"keys\": names in 'config', \"digest\"})", "a valid",
                   settings)
    checks = {"feature_dim": lambda v: _int(v, 1), "grad_dim": lambda v: _int(v, 1),
              "parameters": lambda v: isinstance(v, list) and all(isinstance(p, str) for p in v),
              "parameter_shapes": lambda v: isinstance(v, list) and all(
                  isinstance(s, list) and all(_int(d) for d in s) for s in v)}
    for key, check in checks.items():
        if key in config and not check(config[key]):
            raise _bad(path, f"config.{key}", LEARNT[key], config[key])
    return meta


def check_model_meta(path: Path, meta: dict, digest: str) -> dict[str, Any]:
    """The checked contents of ``models/<id>/meta.json``."""
    if not isinstance(meta.get("fingerprint"), str):
        raise _bad(path, "'fingerprint'", "a string", meta.get("fingerprint"))
    if not isinstance(meta.get("finalized"), bool):
        raise _bad(path, "'finalized'", "a boolean", meta.get("finalized"))
    _settings(path, meta, digest)
    _records(path, "'arrays'", meta, "arrays")
    if meta["finalized"] or "lambda" in meta:
        _lambda(path, "'lambda'", meta.get("lambda"))
    if meta["finalized"]:
        for key, file in BOUND.items():
            held = (meta.get("arrays") or {}).get(file) or {}
            if held.get(key) != meta.get(key):
                hint = repair_hint(path)
                raise StoreCorruptedError(
                    f"{str(path)!r} records {key}={meta.get(key)!r}, but {file} was written "
                    f"for {key}={held.get(key)!r}: the metadata was edited. Restore it, or "
                    + hint[0].lower() + hint[1:])
    return meta


def check_experiment_meta(path: Path, meta: dict, digest: str) -> dict[str, Any]:
    """The checked contents of ``experiments/<name>/meta.json``."""
    ids = meta.get("model_ids")
    if not _int(meta.get("num_targets"), 1):
        raise _bad(path, "'num_targets' (at least 1)", "an integer", meta.get("num_targets"))
    if (not isinstance(ids, list) or not all(_int(i, 0, MAX_MODEL_ID) for i in ids)
            or len(set(ids)) != len(ids)):
        raise _bad(path, "'model_ids' (distinct checkpoint ids)", "a list of integer", ids)
    _settings(path, meta, digest)
    _records(path, "'arrays'", meta, "arrays")
    scores = meta.get("scores")
    if "scores" in meta:
        used = scores.get("model_ids") if isinstance(scores, dict) else None
        lambdas = scores.get("lambda") if isinstance(scores, dict) else None
        if (not is_record(scores) or not isinstance(used, list)
                or not all(_int(i, 0, MAX_MODEL_ID) for i in used)
                or not isinstance(lambdas, dict)):
            raise _bad(path, "'scores' (a file record with the 'model_ids' and 'lambda' used)",
                       "a valid", scores)
        for key, value in lambdas.items():
            _lambda(path, f"scores.lambda.{key}", value)
        if not set(used) <= set(ids):
            raise _bad(path, "'scores.model_ids' (checkpoints of 'model_ids': ids are never "
                       "removed from an experiment)", "valid", used)
    stray = set(meta.get("arrays") or {}) - {f"{i}_targets.npy" for i in ids}
    if stray:
        raise _bad(path, "'arrays' (records of the targets of checkpoints in 'model_ids')",
                   "valid", sorted(stray))
    return meta
