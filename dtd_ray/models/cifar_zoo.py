"""CIFAR-10 networks of other families, as the public checkpoints of ``cifar_zoo`` require them.

Written from the architecture facts (layer order, widths, key names) that a strict load of
each public state dict needs; the registry (:mod:`dtd_ray.models.backbones`) registers them
with their weights records. Each network ends in global average pooling and one
``nn.Linear`` called ``fc``, and names its stages in ``stage_names`` (forward order; the last
is the module whose output is pooled into the features ``f``, for channel maps).

* :class:`ProjResNet`: the CIFAR ResNet (3 stages of ``n`` BasicBlocks, 16/32/64 planes) with
  1×1-conv + BN projection shortcuts where stride or width changes, torchvision key names;
* :func:`shufflenet_v2_cifar`: torchvision's ShuffleNetV2 with a CIFAR stem (3×3 conv of
  stride 1, no max-pool);
* :class:`DenseNetCifar`: DenseNet without bottleneck or compression, every layer's output
  ``cat(new, input)``;
* :class:`ShuffleNetV1`: ShuffleNet (v1) with grouped 1×1 convs and channel shuffle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DenseNetCifar", "ProjResNet", "ShuffleNetV1", "shufflenet_v2_cifar"]


def _pool(x: Tensor) -> Tensor:
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


# --------------------------------------------------------------------------- ResNet, projection shortcuts
class ProjBasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), the shortcut a 1×1 conv + BN where shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ProjResNet(nn.Module):
    """CIFAR ResNet-(6n+2): conv3×3(3→16)+BN+ReLU, stages of ``n`` blocks at 16/32/64 planes
    (stride 2 at the first block of stages 2 and 3), global average pool, ``fc`` (64 → classes)."""

    stage_names = ("layer1", "layer2", "layer3")

    def __init__(self, num_blocks: int, *, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes_in = 16
        for i, (planes, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
            blocks = []
            for s in [stride] + [1] * (num_blocks - 1):
                blocks.append(ProjBasicBlock(planes_in, planes, s))
                planes_in = planes
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(_pool(x))


# --------------------------------------------------------------------------- ShuffleNetV2, CIFAR stem
def shufflenet_v2_cifar(*, num_classes: int = 10) -> nn.Module:
    """torchvision's ShuffleNetV2 ×0.5 (repeats 4, 8, 4; channels 24, 48, 96, 192, 1024) with the
    CIFAR stem: ``conv1`` is a 3×3 conv of stride 1 and there is no max-pool (32×32 inputs keep
    their resolution until stage 2). Keys are torchvision's ``shufflenet_v2_x0_5``."""
    from torchvision.models.shufflenetv2 import ShuffleNetV2

    model = ShuffleNetV2([4, 8, 4], [24, 48, 96, 192, 1024], num_classes=num_classes)
    model.conv1[0].stride = (1, 1)
    model.maxpool = nn.Identity()
    model.stage_names = ("stage2", "stage3", "stage4", "conv5")
    return model


# --------------------------------------------------------------------------- DenseNet
class DenseLayer(nn.Module):
    """BN → ReLU → conv3×3 to ``growth`` channels; the output is ``cat(new, x)``, the new channels first."""

    def __init__(self, in_channels: int, growth: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, growth, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv(F.relu(self.bn(x))), x], 1)


class DenseBlock(nn.Module):
    def __init__(self, in_channels: int, growth: int, layers: int) -> None:
        super().__init__()
        self.dense_layers = nn.Sequential(*(DenseLayer(in_channels + i * growth, growth) for i in range(layers)))

    def forward(self, x: Tensor) -> Tensor:
        return self.dense_layers(x)


class Transition(nn.Module):
    """BN → ReLU → conv1×1 (channels kept) → average pool 2×2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNetCifar(nn.Module):
    """DenseNet-(3L+4) for CIFAR, growth ``growth``, no bottleneck and no compression: conv3×3 (3 → 16),
    three dense blocks of ``L`` layers with two transitions between them, BN + ReLU, global average
    pool, ``fc``. DenseNet-40 (L = 12, growth 12) has 16 + 3·12·12 = 448 features."""

    stage_names = ("dense_block1", "dense_block2", "dense_block3", "relu")

    def __init__(self, *, layers: int = 12, growth: int = 12, num_classes: int = 10) -> None:
        super().__init__()
        c = 16
        self.conv = nn.Conv2d(3, c, 3, padding=1, bias=False)
        for i in (1, 2, 3):
            setattr(self, f"dense_block{i}", DenseBlock(c, growth, layers))
            c += layers * growth
            if i < 3:
                setattr(self, f"transition{i}", Transition(c))
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()  # a module so that its output (the maps pooled into f) can be hooked
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.transition1(self.dense_block1(self.conv(x)))
        x = self.transition2(self.dense_block2(x))
        x = self.relu(self.bn(self.dense_block3(x)))
        return self.fc(_pool(x))


# --------------------------------------------------------------------------- ShuffleNet v1
def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """View the channels as (groups, C/groups), transpose, flatten: each group's outputs spread over all groups."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    """The ShuffleNet unit. Branch: grouped 1×1 conv (``gconv1``) + BN + ReLU → channel shuffle →
    depthwise 3×3 (``dwconv``, stride 2 in a down unit) + BN → grouped 1×1 conv (``gconv2``) + BN.
    Identity unit: ``relu(x + branch)``; down unit: ``relu(cat(branch, shortcut))`` with the shortcut
    an average pool (kernel 2, stride 2), or the input itself where the unit does not down-sample."""

    def __init__(self, in_channels: int, out_channels: int, *, groups: int, down: bool, stride: int,
                 grouped_in: bool = True) -> None:
        super().__init__()
        mid = out_channels // 4
        self.down, self.stride, self.groups = down, stride, groups
        branch_out = out_channels - in_channels if down else out_channels
        self.gconv1 = nn.Conv2d(in_channels, mid, 1, groups=groups if grouped_in else 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.dwconv = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn = nn.BatchNorm2d(mid)
        self.gconv2 = nn.Conv2d(mid, branch_out, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(branch_out)

    def forward(self, x: Tensor) -> Tensor:
        b = channel_shuffle(F.relu(self.bn1(self.gconv1(x))), self.groups)
        b = self.bn2(self.gconv2(self.bn(self.dwconv(b))))
        if not self.down:
            return F.relu(x + b)
        shortcut = F.avg_pool2d(x, 2, 2) if self.stride == 2 else x
        return F.relu(torch.cat([b, shortcut], 1))


class ShuffleNetV1(nn.Module):
    """ShuffleNet (v1) for CIFAR: conv3×3 (3 → 24, stride 1) + BN + ReLU, no max-pool; stages 2–4, each a
    down unit and then 3, 7, 3 identity units (widths 240/480/960 × ``width`` for g = 3); adaptive
    average pool; ``fc``. Stage 2's first unit has an ungrouped ``gconv1`` (24 input channels) and
    does not down-sample (its depthwise conv has stride 1 and its shortcut is the identity)."""

    stage_names = ("stage2", "stage3", "stage4")

    def __init__(self, *, groups: int = 3, width: float = 0.5, num_classes: int = 10) -> None:
        super().__init__()
        base = {1: 144, 2: 200, 3: 240, 4: 272, 8: 384}[groups]
        widths = [int(base * width * 2**i) for i in range(3)]
        self.conv1 = nn.Conv2d(3, 24, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        c = 24
        for i, (out, repeats) in enumerate(zip(widths, (3, 7, 3)), start=2):
            first = i == 2
            units = [ShuffleUnit(c, out, groups=groups, down=True, stride=1 if first else 2, grouped_in=not first)]
            units += [ShuffleUnit(out, out, groups=groups, down=False, stride=1) for _ in range(repeats)]
            setattr(self, f"stage{i}", nn.Sequential(*units))
            c = out
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.stage4(self.stage3(self.stage2(x)))
        return self.fc(_pool(x))
