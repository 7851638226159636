"""The CIFAR ResNets of He et al. (2016, §4.2), option-A shortcuts, as the widely used public checkpoints.

State-dict keys match those checkpoints (``conv1``, ``bn1``, ``layer1..3``, ``linear``), so they
load strictly; the registry (:mod:`dtd_ray.models.backbones`) registers depths 8..1202.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ShortcutA(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad ``planes // 4`` channels on each side.

    Parameter-free, so checkpoints have no shortcut keys; a module rather than the
    original lambda so that models pickle (Ray ships them between processes).
    """

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.planes = planes

    def forward(self, x: Tensor) -> Tensor:
        p = self.planes // 4
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))

    def extra_repr(self) -> str:
        return f"planes={self.planes}"


class BasicBlock(nn.Module):
    """conv3x3-bn-relu-conv3x3-bn, plus the shortcut, then relu."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = ShortcutA(planes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32×32 inputs (He et al. 2016, §4.2): 3 stages of ``n`` blocks, widths 16/32/64."""

    def __init__(self, num_blocks: int, *, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, num_blocks, stride=1)
        self.layer2 = self._make_layer(32, num_blocks, stride=2)
        self.layer3 = self._make_layer(64, num_blocks, stride=2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            # As the public implementation: Kaiming-normal convs and linear weights.
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        # Global average pool: equals the original avg_pool2d(out, width) on square
        # inputs and also works for non-square ones.
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)
