"""The model zoo: models as their libraries build them (torchvision, HuggingFace
transformers, open_clip, Flax as its guides write it), tiny and randomly initialised (no
downloads), through the one-line TRAKer call.

torchvision 0.28's compiled ops (``torchvision/_C.so``) are built for another torch than
the pinned 2.13.0+cpu and do not load; ``import torchvision`` then stops in its fake-kernel
registrations (``@torch.library.register_fake("torchvision::nms")``: "operator
torchvision::nms does not exist"). Defining the two operators' schemas first lets the
import finish; the models used here never call them. transformers imports torchvision
too, so this runs before either is imported (pytest imports this file before the tests of
this folder). The same two lines are in docs/models.md for scripts.
"""

import pytest

torch = pytest.importorskip("torch", reason="the zoo needs torch (the interop extra)")


def _define_torchvision_ops() -> None:
    for name, schema in (("nms", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"),
                         ("qnms", "(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor")):
        try:
            torch.library.define(f"torchvision::{name}", schema)
        except RuntimeError:  # already defined (torchvision's own library loaded, or rerun)
            pass


_define_torchvision_ops()
# torch's intra-op threads fight XLA's and the other test processes for 2 cores
torch.set_num_threads(1)
