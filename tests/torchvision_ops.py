"""torchvision importable next to a CPU-only torch 2.13 (tests and benchmarks only; the
library never needs it).

torchvision 0.28's compiled ops (``torchvision/_C.so``) are built for another torch than
the pinned 2.13.0+cpu and do not load; ``import torchvision`` then stops in its fake-kernel
registrations (``@torch.library.register_fake("torchvision::nms")``: "operator
torchvision::nms does not exist"). Defining the two operators' schemas first lets the
import finish; the models used here never call them. transformers and open_clip import
torchvision too, so this must run before any of them is imported. The same lines are in
docs/models.md for scripts.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCHEMAS = {"nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
           "qnms": "(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor"}


def define_torchvision_ops() -> bool:
    """Define ``torchvision::nms`` and ``torchvision::qnms`` if torchvision is installed
    and its compiled ops do not load; whether they were defined here (False: torchvision's
    own ops loaded, or it is not installed). Safe to call more than once."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    import torch

    for library in sorted(Path(spec.submodule_search_locations[0]).glob("_C.*")):
        try:
            torch.ops.load_library(str(library))
            return False  # the real operators are registered
        except (OSError, RuntimeError):  # built for another torch
            break
    for name, schema in SCHEMAS.items():
        try:
            torch.library.define(f"torchvision::{name}", schema)
        except RuntimeError:  # already defined (by an earlier call)
            pass
    return True
