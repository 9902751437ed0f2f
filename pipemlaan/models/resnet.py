"""ResNet backbones as flat block lists: [stem, block, block, ...] plus a separate classifier.

Each block records its stage, its index within the stage and its channels, which is what
cutting the network into local modules and copying downstream blocks (LAM) needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class BlockInfo:
    stage: int          # 0 for the stem, 1.. for residual stages
    index: int          # position within the stage (0-based)
    in_channels: int
    out_channels: int
    stride: int


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class Classifier(nn.Module):
    """Global average pool + linear: the network's own output layer."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@dataclass
class Backbone:
    """The whole network: blocks[0] is the stem, blocks[1:] the blocks in order (residual
    blocks here; any registered network returns one: models/registry.py)."""

    name: str
    blocks: list[nn.Module]
    info: list[BlockInfo]
    classifier: nn.Module       # the last block's output -> logits (Classifier for ResNets)
    stage_sizes: list[int]

    @property
    def num_blocks(self) -> int:
        """Residual blocks, stem excluded."""
        return len(self.blocks) - 1

    def flat_index(self, stage: int, index: int) -> int:
        """Position in `blocks` of block `index` (0-based) of residual stage `stage` (1-based)."""
        return 1 + sum(self.stage_sizes[: stage - 1]) + index


def init_weights(module: nn.Module, zero_last_bn: bool = False) -> None:
    """He initialisation of convolutions, BatchNorm at (1, 0); with `zero_last_bn` the last
    BatchNorm of every residual block starts at weight 0, so each block starts as its
    shortcut (the reference ImageNet code, after Goyal et al.)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_last_bn:
        for m in module.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                nn.init.zeros_(m.bn2.weight if isinstance(m, BasicBlock) else m.bn3.weight)


def cifar_resnet(depth: int, in_channels: int, num_classes: int, width: int = 16,
                 zero_last_bn: bool = False) -> Backbone:
    """He et al.'s CIFAR ResNet of depth 6n+2: a 3x3 stem and 3 stages of n basic blocks."""
    n = (depth - 2) // 6
    stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                         nn.BatchNorm2d(width), nn.ReLU())
    blocks: list[nn.Module] = [stem]
    info = [BlockInfo(0, 0, in_channels, width, 1)]
    cin = width
    for stage in range(3):
        planes = width * 2 ** stage
        for i in range(n):
            stride = 2 if (stage > 0 and i == 0) else 1
            blocks.append(BasicBlock(cin, planes, stride))
            info.append(BlockInfo(stage + 1, i, cin, planes, stride))
            cin = planes
    classifier = Classifier(cin, num_classes)
    for b in blocks + [classifier]:
        init_weights(b, zero_last_bn)
    return Backbone(f"resnet{depth}", blocks, info, classifier, [n, n, n])


IMAGENET_LAYOUTS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
    "resnet152": (Bottleneck, [3, 8, 36, 3]),
}


def imagenet_resnet(name: str, in_channels: int, num_classes: int,
                    zero_last_bn: bool = True) -> Backbone:
    """torchvision-shaped ImageNet ResNet: 7x7 stride-2 stem + max-pool, then 4 stages."""
    block_cls, sizes = IMAGENET_LAYOUTS[name]
    stem = nn.Sequential(nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                         nn.ReLU(), nn.MaxPool2d(3, 2, 1))
    blocks: list[nn.Module] = [stem]
    info = [BlockInfo(0, 0, in_channels, 64, 4)]
    cin = 64
    for stage, n in enumerate(sizes):
        planes = 64 * 2 ** stage
        for i in range(n):
            stride = 2 if (stage > 0 and i == 0) else 1
            blocks.append(block_cls(cin, planes, stride))
            cout = planes * block_cls.expansion
            info.append(BlockInfo(stage + 1, i, cin, cout, stride))
            cin = cout
    classifier = Classifier(cin, num_classes)
    for b in blocks + [classifier]:
        init_weights(b, zero_last_bn)
    return Backbone(name, blocks, info, classifier, list(sizes))
