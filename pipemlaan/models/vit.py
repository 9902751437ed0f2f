"""Vision Transformers from torchvision as block lists: stem, encoder layers, classifier.

The network is torchvision's own `VisionTransformer` (its patch embedding, `EncoderBlock`s,
initialisation); this file only takes it apart:
  - stem: the patch embedding (`conv_proj`), the class token, the position embedding and the
    encoder's dropout: images (N, C, H, W) -> tokens (N, 1 + H/p * W/p, D);
  - blocks: the encoder layers, each (N, L, D) -> (N, L, D), one stage;
  - classifier: the encoder's final LayerNorm, the class token, torchvision's `heads`.
Chained, the parts compute exactly `VisionTransformer.forward` (tests/test_backbones.py).

Names: `vit_micro` (width 64, depth 4, 2 heads; for tests and CPUs), `vit_tiny` (192, 12, 3)
and `vit_small` (384, 12, 6), patch 4 on the dataset's images (32x32 -> 8x8 tokens, 28x28
Fashion-MNIST -> 7x7), MLP 4x the width; `vit_b_16`, torchvision's ViT-B/16 (patch 16,
224x224 ImageNet images). Images of other than 3 channels get a patch embedding of their
channels, initialised as torchvision initialises its own.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from pipemlaan.errors import ConfigError
from pipemlaan.models.registry import BuildArgs, register
from pipemlaan.models.resnet import Backbone, BlockInfo

if TYPE_CHECKING:     # torchvision.models is imported when a ViT is built: 2 s of every start
    from torchvision.models import VisionTransformer

# name -> (patch, width, depth, heads)
VIT_SHAPES = {
    "vit_micro": (4, 64, 4, 2),
    "vit_tiny": (4, 192, 12, 3),
    "vit_small": (4, 384, 12, 6),
    "vit_b_16": (16, 768, 12, 12),
}


class ViTStem(nn.Module):
    """Patch embedding + class token + position embedding (+ dropout): torchvision's
    `VisionTransformer._process_input` and the first lines of its `Encoder.forward`."""

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        # the attributes torchvision's _process_input reads
        self.image_size, self.patch_size = vit.image_size, vit.patch_size
        self.hidden_dim = vit.hidden_dim
        self.conv_proj = vit.conv_proj
        self.class_token = vit.class_token
        self.pos_embedding = vit.encoder.pos_embedding
        self.dropout = vit.encoder.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.models import VisionTransformer
        x = VisionTransformer._process_input(self, x)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)


class ViTClassifier(nn.Module):
    """The encoder's final LayerNorm, the class token, torchvision's classification head."""

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.ln = vit.encoder.ln
        self.heads = vit.heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.ln(x)[:, 0])


def vit_backbone(name: str, vit: VisionTransformer, in_channels: int) -> Backbone:
    """Takes a built torchvision VisionTransformer apart into a Backbone."""
    if in_channels != vit.conv_proj.in_channels:
        p, d = vit.patch_size, vit.hidden_dim
        vit.conv_proj = nn.Conv2d(in_channels, d, p, p)
        fan_in = in_channels * p * p        # torchvision's initialisation of conv_proj
        nn.init.trunc_normal_(vit.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(vit.conv_proj.bias)
    layers = list(vit.encoder.layers)
    d = vit.hidden_dim
    info = [BlockInfo(0, 0, in_channels, d, vit.patch_size)]
    info += [BlockInfo(1, i, d, d, 1) for i in range(len(layers))]
    return Backbone(name, [ViTStem(vit), *layers], info, ViTClassifier(vit), [len(layers)])


def build_vit(name: str, args: BuildArgs) -> Backbone:
    patch, width, depth, heads = VIT_SHAPES[name]
    h, w = args.image_size
    if h != w or h % patch:
        raise ConfigError(f"model.name={name} takes square images whose side is a multiple of "
                          f"its patch {patch}; these are {h}x{w} (data.synthetic_image or "
                          f"another dataset)")
    from torchvision.models import VisionTransformer, vit_b_16
    if name == "vit_b_16":
        vit = vit_b_16(weights=None, num_classes=args.num_classes, image_size=h)
    else:
        vit = VisionTransformer(image_size=h, patch_size=patch, num_layers=depth,
                                num_heads=heads, hidden_dim=width, mlp_dim=4 * width,
                                num_classes=args.num_classes)
    return vit_backbone(name, vit, args.in_channels)


for _name, (_p, _w, _depth, _h) in VIT_SHAPES.items():
    register(_name, lambda args, n=_name: build_vit(n, args), num_blocks=_depth,
             features="tokens", family="vit")
