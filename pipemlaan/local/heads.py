"""Auxiliary heads: each maps a module's output to a loss (and logits for evaluation).

Two families, chosen by `method.heads` ([Note: head kinds] in local/module.py says which head
each method gets):
- **reference** (default), the heads of the authors' code:
  - `AuxDGLHead` (CIFAR `auxDGL`): average pooling to at most 8x8, three 1x1 conv+BN+ReLU to
    128 channels, global pooling,
    three 512-wide linear+BatchNorm1d+ReLU layers, the classifier;
  - `ConvFCHead` (InfoPro's `AuxClassifier`, config "1c2f"): one 3x3 conv+BN+ReLU (stride 2
    while the channels double), global pooling, linear to 128, ReLU, the classifier;
  - `ImageNetAuxHead` (`auxnet34` / `auxnet101`): two 1x1 conv+BN+ReLU (C -> 2C -> C) on the
    64- and 128-channel stages of basic-block ResNets, then pooling + linear;
  - `InfoProHead` with the reference decoder (3x3 conv to 12 channels with bias, BN, ReLU,
    3x3 conv to the image channels; bilinear upsampling with aligned corners).
- **compact**, pipemlaan's earlier heads: `DGLHead` (two 1x1 conv+BN+ReLU at the module's
  width, 2x2 average pooling, a 4C -> C -> classes MLP) and `InfoProHead` with its decoder.
- `LinearHead` (global pool + linear) serves the plain MLAAN variant and every compact leap head.
- `LeapHead`: LAM's leap network: deep copies of downstream backbone blocks, the first one
  paired with an EMA twin (no gradient of its own, gradient passes through it; its output is
  added to the trainable copy's), then a classifier head.
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


def _conv_bn_relu(cin: int, cout: int, kernel: int = 1, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU()]


class _CrossEntropyHead(nn.Module):
    """A classifier head: subclasses define `logits`; the loss is cross-entropy."""

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x, labels, images=None):
        logits = self.logits(x)
        return F.cross_entropy(logits, labels), logits


class LinearHead(_CrossEntropyHead):
    def __init__(self, cin: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(cin, num_classes)

    def logits(self, x):
        return self.fc(_pool(x))


class DGLHead(_CrossEntropyHead):
    """Compact DGL head: 2x2 pooling keeps coarse layout, which a global pool would erase."""

    def __init__(self, cin: int, num_classes: int, width: int):
        super().__init__()
        self.features = nn.Sequential(*_conv_bn_relu(cin, width), *_conv_bn_relu(width, width))
        self.mlp = nn.Sequential(nn.Linear(4 * width, width), nn.ReLU(),
                                 nn.Linear(width, num_classes))

    def logits(self, x):
        return self.mlp(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 2), 1))


class AuxDGLHead(_CrossEntropyHead):
    """The reference DGL* head (CIFAR `auxDGL.py`, feature_dim 128). Its input is first
    average-pooled to at most 8x8, as the authors' `forward` does
    (`F.adaptive_avg_pool2d(x, (8, 8))`): the 128-channel convolutions then cost the same on
    every stage, and the head far less than the blocks it supervises (docs: the DGL* head)."""

    POOL = 8

    def __init__(self, cin: int, num_classes: int, feature_dim: int = 128):
        super().__init__()
        fd, wide = feature_dim, 4 * feature_dim
        self.features = nn.Sequential(*_conv_bn_relu(cin, fd), *_conv_bn_relu(fd, fd),
                                      *_conv_bn_relu(fd, fd))
        layers: list[nn.Module] = []
        for a in (fd, wide, wide):
            layers += [nn.Linear(a, wide), nn.BatchNorm1d(wide), nn.ReLU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(wide, num_classes))

    def logits(self, x):
        # never up: a map already at most 8x8 (the last CIFAR stage, 7x7 on 28x28 images)
        # goes in unchanged, where adaptive pooling to 8x8 would stretch it
        size = (min(x.shape[-2], self.POOL), min(x.shape[-1], self.POOL))
        if size != tuple(x.shape[-2:]):
            x = F.adaptive_avg_pool2d(x, size)
        return self.mlp(_pool(self.features(x)))


class ConvFCHead(_CrossEntropyHead):
    """InfoPro's "1c2f" classifier: conv to `cout` channels, pool, linear-ReLU-linear."""

    def __init__(self, cin: int, num_classes: int, cout: int, stride: int,
                 feature_dim: int = 128):
        super().__init__()
        self.features = nn.Sequential(*_conv_bn_relu(cin, cout, 3, stride))
        self.mlp = nn.Sequential(nn.Linear(cout, feature_dim), nn.ReLU(),
                                 nn.Linear(feature_dim, num_classes))

    def logits(self, x):
        return self.mlp(_pool(self.features(x)))


class ImageNetAuxHead(_CrossEntropyHead):
    """The reference ImageNet head: C -> hidden -> C 1x1 convolutions (none when hidden=0),
    then pooling + linear."""

    def __init__(self, cin: int, num_classes: int, hidden: int):
        super().__init__()
        self.features = (nn.Sequential(*_conv_bn_relu(cin, hidden), *_conv_bn_relu(hidden, cin))
                         if hidden else nn.Identity())
        self.fc = nn.Linear(cin, num_classes)

    def logits(self, x):
        return self.fc(_pool(self.features(x)))


class InfoProHead(nn.Module):
    """Reconstruction (BCE against the un-normalised image in [0, 1]) + a classifier head.
    `reference=True`: the authors' decoder (first conv with bias, upsampling with aligned
    corners); False: pipemlaan's compact one. The sigmoid is folded into the loss
    (`binary_cross_entropy_with_logits`: the same value, without its overflow)."""

    def __init__(self, cin: int, classifier: _CrossEntropyHead, image_channels: int,
                 mean: tuple[float, ...], std: tuple[float, ...], recon_w: float, ce_w: float,
                 reference: bool = True):
        super().__init__()
        self.decoder = nn.Sequential(
            nn.Conv2d(cin, 12, 3, 1, 1, bias=reference), nn.BatchNorm2d(12), nn.ReLU(),
            nn.Conv2d(12, image_channels, 3, 1, 1))
        self.align_corners = reference
        self.classifier = classifier
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.recon_w, self.ce_w = recon_w, ce_w

    def forward(self, x, labels, images):
        logits = self.classifier.logits(x)
        loss = self.ce_w * F.cross_entropy(logits, labels)
        if self.recon_w:
            target = (images * self.std + self.mean).clamp(0, 1)
            up = F.interpolate(x, size=images.shape[-2:], mode="bilinear",
                               align_corners=self.align_corners)
            recon = self.decoder(up)
            loss = loss + self.recon_w * F.binary_cross_entropy_with_logits(recon, target)
        return loss, logits


class LeapHead(nn.Module):
    """Copies of downstream blocks (taken at construction, so equal to the live blocks'
    weights then) + an EMA twin of the first copy + a classifier head."""

    def __init__(self, blocks: list[nn.Module], classifier: nn.Module):
        super().__init__()
        self.copies = nn.ModuleList(copy.deepcopy(b) for b in blocks)
        self.twin = copy.deepcopy(blocks[0])
        self.twin.requires_grad_(False)
        for m in self.twin.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = 0.0   # its running statistics follow the live block by EMA only
        self.classifier = classifier

    def forward(self, x, labels, images=None):
        y = self.copies[0](x) + self.twin(x)
        for block in self.copies[1:]:
            y = block(y)
        return self.classifier(y, labels, images)


class ClassifierHead(nn.Module):
    def __init__(self, classifier: Classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, x, labels, images=None):
        logits = self.classifier(x)
        return F.cross_entropy(logits, labels), logits
