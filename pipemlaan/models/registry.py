"""The model registry: the one door through which a backbone enters pipemlaan.

A backbone is a list of blocks (pipemlaan.models.resnet.Backbone): `blocks[0]` is the stem,
`blocks[1:]` run in order, `classifier` maps the last block's output to logits, and one
`BlockInfo` per block says its stage (stem 0, then 1, 2, ...), its place within the stage and
its input/output channels (the feature width for token networks). That is all the cut into K
local modules, the heads, the MLM windows and the LAM leap copies need (models/split.py,
local/module.py); nothing else in the trainer knows what a block is.

    from pipemlaan.models import BuildArgs, register

    def build(args: BuildArgs) -> Backbone: ...
    register("mynet", build, num_blocks=6, features="tokens")

`num_blocks` (blocks after the stem) is declared so that a configuration can be checked
without building the network. `features` says what the blocks output, and so which heads a
module gets: "maps" (N, C, H, W feature maps: the ResNet heads) or "tokens" (N, L, C token
sequences, or N, C vectors: local/token_heads.py). `family` picks family-specific defaults
("cifar" and "imagenet" ResNets keep their reference heads and initialisation; anything else
is "custom"). A module `model.plugin` names is imported before the name is looked up, so a
torchrun launch of `python -m pipemlaan.train` sees the user's registrations on every rank
(docs/backbones.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from pipemlaan.errors import ConfigError
from pipemlaan.models.resnet import Backbone

FEATURES = ("maps", "tokens")


@dataclass(frozen=True)
class BuildArgs:
    """What a builder is given: the dataset's image shape and classes, and model options."""

    in_channels: int
    num_classes: int
    image_size: tuple[int, int]
    width: int = 16                  # model.width (the CIFAR ResNets' first stage)
    zero_last_bn: bool = False       # model.zero_init_last_bn, resolved


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[[BuildArgs], Backbone]
    num_blocks: int
    features: str = "maps"
    family: str = "custom"
    zero_last_bn_default: bool = False


_ENTRIES: dict[str, ModelEntry] = {}
# name patterns resolved on lookup (the CIFAR ResNets: any depth 6n+2): regex -> entry factory
_PATTERNS: list[tuple[re.Pattern, Callable[[re.Match], ModelEntry | None], str]] = []


def register(name: str, builder: Callable[[BuildArgs], Backbone], *, num_blocks: int,
             features: str = "maps", family: str = "custom",
             zero_last_bn_default: bool = False) -> None:
    """Makes `model.name=<name>` build `builder(BuildArgs)`. Registering a name again replaces
    it (a re-imported plugin); `num_blocks` counts the blocks after the stem."""
    if features not in FEATURES:
        raise ConfigError(f"register({name!r}): features={features!r}; use one of "
                          f"{', '.join(FEATURES)}")
    if num_blocks < 1:
        raise ConfigError(f"register({name!r}): num_blocks={num_blocks}; a backbone needs at "
                          f"least one block after its stem")
    _ENTRIES[name] = ModelEntry(name, builder, num_blocks, features, family,
                                zero_last_bn_default)


def register_pattern(pattern: str, make: Callable[[re.Match], ModelEntry | None],
                     describe: str) -> None:
    """A family of names by regular expression (`make` returns None for a match it refuses);
    `describe` is how the error for an unknown name lists it."""
    _PATTERNS.append((re.compile(pattern), make, describe))


def lookup(name: str) -> ModelEntry:
    """The entry of `name`; ConfigError listing the known names for anything else."""
    if name in _ENTRIES:
        return _ENTRIES[name]
    for pattern, make, _ in _PATTERNS:
        m = pattern.fullmatch(name)
        if m and (entry := make(m)) is not None:
            return entry
    known = [d for _, _, d in _PATTERNS] + sorted(_ENTRIES)
    raise ConfigError(f"model.name={name!r} is unknown; use one of {', '.join(known)}, or "
                      f"register your own (pipemlaan.models.register, docs/backbones.md)")


def registered_names() -> list[str]:
    return sorted(_ENTRIES)


def build(name: str, args: BuildArgs) -> Backbone:
    """Builds `name` and checks what the cut relies on: one BlockInfo per block, the declared
    block count, a classifier."""
    entry = lookup(name)
    bb = entry.builder(args)
    if len(bb.blocks) != entry.num_blocks + 1 or len(bb.info) != len(bb.blocks):
        raise ConfigError(f"model {name!r}: its builder returned {len(bb.blocks)} blocks with "
                          f"{len(bb.info)} BlockInfo, but it was registered with num_blocks="
                          f"{entry.num_blocks} (blocks = stem + num_blocks, one BlockInfo each)")
    if sum(bb.stage_sizes) != entry.num_blocks:
        raise ConfigError(f"model {name!r}: stage_sizes {bb.stage_sizes} must add up to "
                          f"num_blocks={entry.num_blocks}")
    return bb
