"""The model zoo: models as their libraries build them (torchvision, HuggingFace
transformers, open_clip, Flax as its guides write it), tiny and randomly initialised (no
downloads), through the one-line TRAKer call.

torchvision 0.28's compiled ops do not load next to the pinned torch 2.13.0+cpu:
tests/torchvision_ops.py defines what its import needs. transformers imports torchvision
too, so this runs before either is imported (pytest imports this file before the tests of
this folder).
"""

import pytest

torch = pytest.importorskip("torch", reason="the zoo needs torch (the interop extra)")

from torchvision_ops import define_torchvision_ops  # noqa: E402 (tests/ is on sys.path)

define_torchvision_ops()
# torch's intra-op threads fight XLA's and the other test processes for 2 cores
torch.set_num_threads(1)
