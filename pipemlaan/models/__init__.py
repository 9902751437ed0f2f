"""Backbones by name: the registry (models/registry.py) and the networks registered in it.

`register(name, builder, num_blocks=..., features=...)` is the extension point
(docs/backbones.md); the CIFAR ResNets (any depth 6n+2), the ImageNet ResNets
(models/resnet.py) and torchvision's Vision Transformers (models/vit.py) go through the same
door. `build_backbone(name, in_channels, num_classes, ...)` builds any registered name;
`split` holds the paper's module split points and LAM copy lists.
"""

from __future__ import annotations

from pipemlaan.errors import ConfigError
from pipemlaan.models import vit  # noqa: F401  (registers the ViTs)
from pipemlaan.models.registry import (FEATURES, BuildArgs, ModelEntry, build, lookup, register,
                                       register_pattern, registered_names)
from pipemlaan.models.resnet import (IMAGENET_LAYOUTS, Backbone, BlockInfo, cifar_resnet,
                                     imagenet_resnet)


def _cifar_entry(m) -> ModelEntry | None:
    depth = int(m.group(1))
    if depth < 8 or (depth - 2) % 6:
        return None
    return ModelEntry(m.group(0), lambda a: cifar_resnet(depth, a.in_channels, a.num_classes,
                                                         a.width, a.zero_last_bn),
                      3 * ((depth - 2) // 6), "maps", "cifar", False)


for _name, (_cls, _sizes) in IMAGENET_LAYOUTS.items():
    # registered before the CIFAR pattern is tried: resnet34/101/152 are the ImageNet ones
    register(_name, lambda a, n=_name: imagenet_resnet(n, a.in_channels, a.num_classes,
                                                       a.zero_last_bn),
             num_blocks=sum(_sizes), family="imagenet", zero_last_bn_default=True)
register_pattern(r"resnet(\d+)", _cifar_entry,
                 "a CIFAR ResNet of depth 6n+2 (resnet8, resnet14, resnet20, resnet32, "
                 "resnet110, ...)")


def parse_model_name(name: str) -> tuple[str, int]:
    """(family, depth) of a ResNet name: ('cifar', 32), ('imagenet', 34); ConfigError for a
    name that is no ResNet."""
    entry = lookup(name)
    if entry.family not in ("cifar", "imagenet"):
        raise ConfigError(f"model.name={name!r} is not a ResNet; this needs resnetD (6n+2) or "
                          f"{', '.join(IMAGENET_LAYOUTS)}")
    return entry.family, int(name[6:])


def num_blocks(name: str) -> int:
    """Blocks of a model after its stem, from the registry, without building it."""
    return lookup(name).num_blocks


def family(name: str) -> str:
    """'cifar', 'imagenet', 'vit' or 'custom' (a user's registration)."""
    return lookup(name).family


def features(name: str) -> str:
    """What the model's blocks output: 'maps' (N, C, H, W) or 'tokens' (N, L, C)."""
    return lookup(name).features


def zero_last_bn_default(name: str) -> bool:
    """The reference initialisation: the ImageNet code zeroes every block's last BatchNorm
    weight, the CIFAR code does not (the registry entry says, per model)."""
    return lookup(name).zero_last_bn_default


def build_backbone(name: str, in_channels: int, num_classes: int, width: int = 16,
                   zero_last_bn: bool | None = None,
                   image_size: tuple[int, int] = (32, 32)) -> Backbone:
    """`zero_last_bn=None`: the model's default (`zero_last_bn_default`: on for the ImageNet
    ResNets, as the reference ResNet-34 code; its ResNet-101 never zero-inits).
    `image_size` (H, W): what shape-bound models (the ViTs) are built for."""
    if zero_last_bn is None:
        zero_last_bn = zero_last_bn_default(name)
    return build(name, BuildArgs(in_channels, num_classes, tuple(image_size), width,
                                 zero_last_bn))


__all__ = ["FEATURES", "Backbone", "BlockInfo", "BuildArgs", "ModelEntry", "build_backbone",
           "family", "features", "lookup", "num_blocks", "parse_model_name", "register",
           "registered_names", "zero_last_bn_default"]
