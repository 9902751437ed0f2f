"""Backbone registry: model names -> flat block lists, and the cut into local modules.

`build_backbone(name, in_channels, num_classes)` is the one entry point; `split` holds the
paper's module split points and LAM copy lists.
"""

from __future__ import annotations

import re

from pipemlaan.errors import ConfigError
from pipemlaan.models.resnet import IMAGENET_LAYOUTS, Backbone, cifar_resnet, imagenet_resnet


def parse_model_name(name: str) -> tuple[str, int]:
    """('cifar', depth) or ('imagenet', depth); raises ConfigError for anything else."""
    if name in IMAGENET_LAYOUTS:
        return "imagenet", int(name[6:])
    m = re.fullmatch(r"resnet(\d+)", name)
    if m and int(m.group(1)) >= 8 and (int(m.group(1)) - 2) % 6 == 0:
        return "cifar", int(m.group(1))
    raise ConfigError(f"model.name={name!r} is unknown; use a CIFAR ResNet of depth 6n+2 "
                      f"(resnet8, resnet14, resnet20, resnet32, resnet110, ...) or "
                      f"{', '.join(IMAGENET_LAYOUTS)}")


def num_blocks(name: str) -> int:
    """Residual blocks of a model (stem excluded), without building it."""
    family, depth = parse_model_name(name)
    if family == "imagenet":
        return sum(IMAGENET_LAYOUTS[name][1])
    return 3 * ((depth - 2) // 6)


def zero_last_bn_default(name: str) -> bool:
    """The reference initialisation: the ImageNet code zeroes every block's last BatchNorm
    weight, the CIFAR code does not."""
    return parse_model_name(name)[0] == "imagenet"


def build_backbone(name: str, in_channels: int, num_classes: int, width: int = 16,
                   zero_last_bn: bool | None = None) -> Backbone:
    """`zero_last_bn=None`: the family's default (`zero_last_bn_default`: on for the ImageNet
    ResNets, as the reference ResNet-34 code; its ResNet-101 never zero-inits)."""
    family, depth = parse_model_name(name)
    if zero_last_bn is None:
        zero_last_bn = zero_last_bn_default(name)
    if family == "imagenet":
        return imagenet_resnet(name, in_channels, num_classes, zero_last_bn)
    return cifar_resnet(depth, in_channels, num_classes, width, zero_last_bn)


__all__ = ["Backbone", "build_backbone", "num_blocks", "parse_model_name", "zero_last_bn_default"]
