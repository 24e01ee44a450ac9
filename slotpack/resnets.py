"""ResNet-20 and ResNet-18 for CIFAR-10 as plain dense ``nn.Module``s (slotify makes them slot
networks; ``models.create("resnet20")`` does both).

- ResNet-20 is He et al. 2016's CIFAR network (section 4.2): a 3x3 convolution with 16 channels,
  three stages of three basic blocks (16, 32, 64 channels; the first block of stages 2 and 3
  halves the resolution), global average pooling and a 64 -> 10 classifier. Shortcuts are
  option A: identity, and where the shape changes the input subsampled by 2 and zero-padded in
  channels, so they hold no weights and the network has the canonical 0.27M (268,336) weights.
- ResNet-18 is torchvision's ``resnet18(num_classes=10)`` with the usual CIFAR stem: a 3x3
  stride-1 convolution in place of the 7x7 stride-2 one, and no max pool (option-B 1x1
  convolution shortcuts, as torchvision has them).

Convolutions have no bias (BatchNorm follows each); the classifier has one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _ShortcutA(nn.Module):
    """Option A: every second pixel of the input, zero-padded with ``pad`` channels each side."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = _ShortcutA((planes - in_planes) // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """He et al.'s CIFAR ResNet with 6n+2 = 20 layers (n=3), option-A shortcuts."""

    def __init__(self, num_classes: int = 10, n: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem (3x3 stride-1 convolution, no max pool)."""
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # keeps its place in named_modules()
    model.maxpool = nn.Identity()
    return model


BUILDERS = {"resnet20": ResNet20, "resnet18": resnet18}


def build(name: str, num_classes: int = 10) -> nn.Module:
    """The dense module of zoo module model ``name`` (torch's default initialisation)."""
    return BUILDERS[name](num_classes=num_classes)
