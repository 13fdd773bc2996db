"""The torch twin of the demo's nnx CNN (``trax_attr.apps.demo.CNN``), for ``trax-attr demo --torch``.

Same layer names (conv1, bn1, conv2, bn2, head), so :func:`interop.flax_to_torch` moves a
demo checkpoint onto it. It takes the demo's NHWC digits ``(B, 8, 8, 1)`` and transposes
inside, and flattens in NHWC order before the head, so its logits equal the Flax CNN's.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TorchDemoCNN", "torch_checkpoints"]


class TorchDemoCNN(nn.Module):
    """Two 3x3 conv + BatchNorm + ReLU + 2x2 average-pool blocks and a linear head.

    Input ``(B, 8, 8, 1)`` f32 (NHWC, as the Flax CNN); output ``(B, 10)`` logits.
    """

    def __init__(self):
        super().__init__()
        # padding=1 is Flax's SAME for a 3x3 kernel; both BatchNorms use eps 1e-5
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.head = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x):
        x = x.permute(0, 3, 1, 2)
        x = nn.functional.avg_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = nn.functional.avg_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        # Flax flattens (h, w, c); the head's weights expect that order
        return self.head(x.permute(0, 2, 3, 1).reshape(x.shape[0], -1))


def torch_checkpoints(flax_checkpoints) -> tuple[TorchDemoCNN, list[dict[str, torch.Tensor]]]:
    """The eval-mode torch twin and one state_dict per demo checkpoint (nnx.State)."""
    from ..interop.weights import flax_to_torch

    module = TorchDemoCNN().eval()
    return module, [flax_to_torch(state, module) for state in flax_checkpoints]
