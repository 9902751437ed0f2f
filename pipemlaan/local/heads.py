"""Auxiliary heads: each maps a module's output to a loss (and logits for evaluation).

- `LinearHead`: global pool + linear.
- `DGLHead`: two 1x1 conv+BN+ReLU layers, average pooling to 2x2 (DGL's spatial averaging keeps
  coarse layout, which a global pool would erase), a two-layer MLP (DGL's auxiliary net).
- `InfoProHead`: a decoder that reconstructs the image (BCE) plus a DGL-style classifier; the
  two losses are weighted, the weights interpolated linearly with module depth (InfoPro).
- `LeapHead`: LAM's leap network: deep copies of downstream backbone blocks, the first one
  paired with an EMA twin (no gradient of its own, gradient passes through it; its output is
  added to the trainable copy's), then pool + linear.
- `ClassifierHead`: the network's own classifier, which trains the last module.

Every head's forward is `(features, labels, images) -> (loss, logits)`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from pipemlaan.models.resnet import Classifier


def _pool(x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class LinearHead(nn.Module):
    def __init__(self, cin: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x, labels, images=None):
        logits = self.fc(_pool(x))
        return F.cross_entropy(logits, labels), logits


class DGLHead(nn.Module):
    def __init__(self, cin: int, num_classes: int, width: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.mlp = nn.Sequential(nn.Linear(4 * width, width), nn.ReLU(),
                                 nn.Linear(width, num_classes))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 2), 1))

    def forward(self, x, labels, images=None):
        logits = self.logits(x)
        return F.cross_entropy(logits, labels), logits


class InfoProHead(nn.Module):
    """Reconstruction (BCE against the un-normalised image in [0, 1]) + classification."""

    def __init__(self, cin: int, num_classes: int, width: int, image_channels: int,
                 mean: tuple[float, ...], std: tuple[float, ...], recon_w: float, ce_w: float):
        super().__init__()
        self.decoder = nn.Sequential(
            nn.Conv2d(cin, 12, 3, 1, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
            nn.Conv2d(12, image_channels, 3, 1, 1))
        self.classifier = DGLHead(cin, num_classes, width)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.recon_w, self.ce_w = recon_w, ce_w

    def forward(self, x, labels, images):
        logits = self.classifier.logits(x)
        loss = self.ce_w * F.cross_entropy(logits, labels)
        if self.recon_w:
            target = (images * self.std + self.mean).clamp(0, 1)
            up = F.interpolate(x, size=images.shape[-2:], mode="bilinear", align_corners=False)
            recon = self.decoder(up)
            loss = loss + self.recon_w * F.binary_cross_entropy_with_logits(recon, target)
        return loss, logits


class LeapHead(nn.Module):
    """Copies of downstream blocks (taken at construction, so equal to the live blocks' initial
    weights) + an EMA twin of the first copy + pool + linear."""

    def __init__(self, blocks: list[nn.Module], num_classes: int, out_channels: int):
        super().__init__()
        self.copies = nn.ModuleList(copy.deepcopy(b) for b in blocks)
        self.twin = copy.deepcopy(blocks[0])
        self.twin.requires_grad_(False)
        for m in self.twin.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.0   # its running statistics follow the live block by EMA only
        self.fc = nn.Linear(out_channels, num_classes)

    def forward(self, x, labels, images=None):
        y = self.copies[0](x) + self.twin(x)
        for block in self.copies[1:]:
            y = block(y)
        logits = self.fc(_pool(y))
        return F.cross_entropy(logits, labels), logits


class ClassifierHead(nn.Module):
    def __init__(self, classifier: Classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, x, labels, images=None):
        logits = self.classifier(x)
        return F.cross_entropy(logits, labels), logits
