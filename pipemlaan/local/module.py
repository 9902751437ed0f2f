"""The unit a rank owns: one local module with its heads, its optimizer, and the cascade plan.

[Note: window plan] Module j may carry a head h_j whose loss ("window j") trains the `reach`
modules j-reach+1..j (MLM: reach = method.window; LAM alone: reach = 1, the leap head sits on
module j alone). The last module's h is the network's own classifier. Under MLM the windows
start as in the reference code: the first window closes at module `lead` = window-1 (one
later when the stem is a module of its own, K = blocks + 1, because the reference merges the
stem into its first module) and reaches back to module 0; the modules before it have no
loss of their own and learn only through the windows downstream. `method.first_modules_head`
restores pipemlaan's earlier plan: every window has `window` modules, from module window-1
on, and every non-last module has a g. Otherwise every non-last module from `lead` on has
an independent head g_j, which trains module j alone. A module's objective is
`w_g * L(g) + w_h * L(h)` when it has both, else the one loss at weight 1. End-to-end BP is
a single module whose h is the classifier.

[Note: head kinds] With method.heads = "reference" (the authors' code):
  g of dgl+mlm/lam/mlaan (DGL*)  AuxDGLHead; ImageNet ResNets: ImageNetAuxHead
  g of plain dgl                 ConvFCHead ("1c2f": the reference DGL baseline's head)
  g of infopro (either)          decoder + ConvFCHead (ImageNet: + ImageNetAuxHead)
  g of linear                    LinearHead
  leap head classifier           the variant's g head on the leap output (DGL*, InfoPro*),
                                 LinearHead for the plain MLAAN variant (linear)
With "compact": DGLHead / InfoProHead(DGLHead) as g, LinearHead after every leap network.
Backbones of token features (ViTs; models/registry.py features="tokens"): TokenHead as g and
at the end of leap networks, TokenLinearHead for linear and after compact leap networks
(local/token_heads.py); InfoPro is refused (no token decoder).

`build_local_modules` builds the full network on every rank from the seed, so every rank holds
identical initial weights; LAM copies equal the live blocks they copy, unless
method.leap_init re-initialises them (the reference ImageNet code).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import nn

from pipemlaan.config import Config
from pipemlaan.data import DatasetSpec
from pipemlaan.local.heads import (AuxDGLHead, ClassifierHead, ConvFCHead, DGLHead,
                                   ImageNetAuxHead, InfoProHead, LeapHead, LinearHead)
from pipemlaan.local.token_heads import TokenHead, TokenLinearHead
from pipemlaan.models import build_backbone, family, features, num_blocks, zero_last_bn_default
from pipemlaan.models.resnet import Backbone, BasicBlock, init_weights
from pipemlaan.models.split import lam_copies, module_ranges


@dataclass(frozen=True)
class WindowPlan:
    """Which windows exist and which modules each one trains (pure bookkeeping)."""

    K: int
    reach: tuple[int, ...]   # reach[j] = modules trained by window j; 0 = module j has no h

    def covering(self, k: int) -> list[int]:
        """Windows whose loss reaches module k, in ascending order."""
        return [j for j in range(k, self.K) if self.reach[j] and j - self.reach[j] + 1 <= k]

    def continues_past(self, j: int, k: int) -> bool:
        """Does window j's gradient go on from module k to module k-1?"""
        return j - self.reach[j] + 1 < k

    def needs_input_grad(self, k: int) -> bool:
        return any(self.continues_past(j, k) for j in self.covering(k))


def stem_alone(cfg: Config, K: int) -> bool:
    return K == num_blocks(cfg.model.name) + 1


def first_window(cfg: Config, K: int) -> int:
    """`lead` of [Note: window plan]: the module where the first window closes under MLM
    (modules before it have no head), 0 without MLM."""
    m = cfg.method
    if not m.mlm or m.name == "bp":
        return 0
    if m.first_modules_head:
        return m.window - 1
    return m.window - 1 + (1 if stem_alone(cfg, K) else 0)


def window_plan(cfg: Config, K: int) -> WindowPlan:
    m = cfg.method
    if m.name == "bp":
        return WindowPlan(1, (1,))
    W = m.window if m.mlm else 1
    lead = first_window(cfg, K)
    reach = []
    for j in range(K):
        if j == K - 1:
            reach.append(K if m.mlm and j <= lead else min(W, K))
        elif m.mlm:
            reach.append(0 if j < lead else (j + 1 if j == lead else W))
        else:
            reach.append(1 if m.lam else 0)
    return WindowPlan(K, tuple(reach))


class LocalModule(nn.Module):
    """Backbone blocks [first..last] plus the module's heads g (independent) and h (window)."""

    def __init__(self, index: int, blocks: list[nn.Module], g: nn.Module | None,
                 h: nn.Module | None, twin_source: int | None, block_range: tuple[int, int]):
        super().__init__()
        self.index = index
        self.body = nn.Sequential(*blocks)
        self.g = g
        self.h = h
        self.twin_source = twin_source     # backbone block index the EMA twin follows
        self.block_range = block_range

    @property
    def twin(self) -> nn.Module | None:
        return self.h.twin if isinstance(self.h, LeapHead) else None

    def param_groups(self, cfg: Config) -> list[dict]:
        t = cfg.train
        groups = [{"params": list(self.body.parameters()), "lr_mult": t.lr_mult_backbone}]
        if self.g is not None:
            groups.append({"params": [p for p in self.g.parameters() if p.requires_grad],
                           "lr_mult": t.lr_mult_g})
        if self.h is not None:
            mult = t.lr_mult_backbone if isinstance(self.h, ClassifierHead) else t.lr_mult_h
            groups.append({"params": [p for p in self.h.parameters() if p.requires_grad],
                           "lr_mult": mult})
        return [g for g in groups if g["params"]]


def make_optimizer(module: LocalModule, cfg: Config) -> torch.optim.SGD:
    """SGD as one fused kernel per step, which can skip a step on the device (`found_inf`,
    engine/updates.py [Note: non-finite on the device]). Momentum buffers start at zero: the
    first step then gives the same buffer as torch's (a copy of the gradient), and a skipped
    first step leaves no uninitialised buffer behind."""
    t = cfg.train
    opt = torch.optim.SGD(module.param_groups(cfg), lr=t.lr, momentum=t.momentum,
                          nesterov=t.nesterov and t.momentum > 0, weight_decay=t.weight_decay,
                          fused=True)
    if t.momentum > 0:
        for group in opt.param_groups:
            for p in group["params"]:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p,
                                                                   memory_format=torch.preserve_format)
    return opt


def _classifier(cfg: Config, spec: DatasetSpec, backbone: Backbone, cin: int) -> nn.Module:
    """The classifier part of a dgl / infopro head on `cin` channels ([Note: head kinds])."""
    m, classes = cfg.method, spec.num_classes
    if m.heads == "compact":
        return DGLHead(cin, classes, m.head_width or cin)
    if family(backbone.name) == "imagenet":
        basic = isinstance(backbone.blocks[1], BasicBlock)
        return ImageNetAuxHead(cin, classes, 2 * cin if basic and cin < 256 else 0)
    if m.name == "dgl" and (m.mlm or m.lam):
        return AuxDGLHead(cin, classes, m.head_width or 128)
    cout = min(2 * cin, backbone.info[-1].out_channels)
    return ConvFCHead(cin, classes, max(cout, cin), 2 if cout > cin else 1, m.head_width or 128)


def _head(cfg: Config, spec: DatasetSpec, backbone: Backbone, cin: int,
          infopro_w: tuple[float, float]) -> nn.Module:
    """The variant's head on `cin` channels: a module's g, or what ends its leap network."""
    m = cfg.method
    if features(backbone.name) == "tokens":     # infopro is refused by config validation
        if m.name == "linear":
            return TokenLinearHead(cin, spec.num_classes, m.token_pool)
        return TokenHead(cin, spec.num_classes, m.head_width, m.token_pool)
    if m.name == "linear":
        return LinearHead(cin, spec.num_classes)
    cls = _classifier(cfg, spec, backbone, cin)
    if m.name == "dgl":
        return cls
    return InfoProHead(cin, cls, spec.in_channels, spec.mean, spec.std, *infopro_w,
                       reference=m.heads == "reference")


def infopro_weights(cfg: Config, backbone: Backbone, K: int, i: int, last_block: int
                    ) -> tuple[float, float]:
    """(reconstruction, classification) weights of module i's InfoPro losses: the first
    and last values of method.infopro_recon / infopro_ce, interpolated by
    ratio = min(index / (K' - 2), 1) (0 when K' <= 2) where index is the module index and K' = K
    (`module`), or index is the stage of the module's last block and K' the reference's
    module count, stem merged (`stage`, the reference InfoPro* code)."""
    m = cfg.method
    mode = m.infopro_ratio
    if mode == "auto":
        mode = "stage" if (m.mlm or m.lam) else "module"
    if mode == "module":
        index, k = i, K
    else:
        index, k = backbone.info[last_block].stage, K - (1 if stem_alone(cfg, K) else 0)
    # the reference formula passes 1 for K' < 5 (stage 3 / 2), which would turn the weights
    # negative: it is held at 1
    ratio = min(index / (k - 2), 1.0) if k > 2 else 0.0
    (r0, r1), (c0, c1) = m.infopro_recon, m.infopro_ce
    return r0 + (r1 - r0) * ratio, c0 + (c1 - c0) * ratio


def _linear_head(cfg: Config, spec: DatasetSpec, backbone: Backbone, cin: int) -> nn.Module:
    if features(backbone.name) == "tokens":
        return TokenLinearHead(cin, spec.num_classes, cfg.method.token_pool)
    return LinearHead(cin, spec.num_classes)


def _reinit(backbone: Backbone, part: nn.Module, zero_last_bn: bool) -> None:
    """Fresh weights for leap copies: the ResNets' initialisation, else every layer's own
    `reset_parameters` (a ViT's linear layers, attention and norms; a user's layers)."""
    if family(backbone.name) in ("cifar", "imagenet"):
        init_weights(part, zero_last_bn)
        return
    for m in part.modules():
        if m is not part and hasattr(m, "reset_parameters"):
            m.reset_parameters()


def _fresh_leap(cfg: Config) -> bool:
    if cfg.method.leap_init == "auto":
        return family(cfg.model.name) == "imagenet"
    return cfg.method.leap_init == "fresh"


def _zero_last_bn(cfg: Config) -> bool:
    choice = cfg.model.zero_init_last_bn
    return zero_last_bn_default(cfg.model.name) if choice == "auto" else choice == "on"


# Building seeds the global RNG and draws from it: ranks that are threads of one process
# (tests/inprocess.py) must build one at a time to get identical weights.
_BUILD_LOCK = threading.Lock()


def build_local_modules(cfg: Config, spec: DatasetSpec) -> tuple[Backbone, list[LocalModule]]:
    """Cuts the seeded backbone into K local modules and attaches their heads."""
    with _BUILD_LOCK:
        return _build(cfg, spec)


def _build(cfg: Config, spec: DatasetSpec) -> tuple[Backbone, list[LocalModule]]:
    torch.manual_seed(cfg.train.seed)
    zero_last_bn = _zero_last_bn(cfg)
    backbone = build_backbone(cfg.model.name, spec.in_channels, spec.num_classes,
                              cfg.model.width, zero_last_bn, spec.image_size)
    K = 1 if cfg.method.name == "bp" else cfg.model.K
    ranges = module_ranges(backbone, K)
    plan = window_plan(cfg, K)
    lead = first_window(cfg, K)
    modules = []
    for i, (first, last) in enumerate(ranges):
        blocks = backbone.blocks[first:last + 1]
        cout = backbone.info[last].out_channels
        weights = infopro_weights(cfg, backbone, K, i, last)
        headless = i < lead and not cfg.method.first_modules_head
        g = None if i == K - 1 or headless else _head(cfg, spec, backbone, cout, weights)
        h, twin_source = None, None
        if i == K - 1:
            h = ClassifierHead(backbone.classifier)
        elif plan.reach[i]:
            if cfg.method.lam:
                src = lam_copies(backbone, ranges, i)
                leap_out = backbone.info[src[-1]].out_channels
                classifier = (_linear_head(cfg, spec, backbone, leap_out)
                              if cfg.method.heads == "compact"
                              else _head(cfg, spec, backbone, leap_out, weights))
                h = LeapHead([backbone.blocks[b] for b in src], classifier)
                if _fresh_leap(cfg):    # the reference ImageNet code re-initialises them
                    for part in (h.copies, h.twin):
                        _reinit(backbone, part, zero_last_bn)
                twin_source = src[0]
            else:
                h = _head(cfg, spec, backbone, cout, weights)
        modules.append(LocalModule(i, blocks, g, h, twin_source, (first, last)))
    return backbone, modules


@torch.no_grad()
def output_shapes(modules: list[LocalModule], image_shape) -> list[tuple[int, ...]]:
    """Each module's output shape (without the batch), from one eval-mode pass on a zero
    image on the CPU (modules on another device are visited on theirs)."""
    x, shapes = torch.zeros(1, *image_shape), []
    for m in modules:
        was = m.training
        m.eval()
        x = m.body(x.to(next(m.body.parameters()).device)).cpu()
        m.train(was)
        shapes.append(tuple(x.shape[1:]))
    return shapes


def block_state(block: nn.Module) -> list[torch.Tensor]:
    """The tensors an EMA twin follows: parameters, then floating-point buffers, in order."""
    return [p for p in block.parameters()] + [b for b in block.buffers() if b.is_floating_point()]


@torch.no_grad()
def ema_update(twin: nn.Module, live: list[torch.Tensor], decay: float) -> None:
    """ema = decay * ema + (1 - decay) * live, for every tensor of `block_state`, as two
    multi-tensor launches (the same arithmetic, element for element, as one op per tensor)."""
    ema = block_state(twin)
    live = [x if x.dtype == e.dtype else x.to(e.dtype) for e, x in zip(ema, live)]
    torch._foreach_mul_(ema, decay)
    torch._foreach_add_(ema, live, alpha=1.0 - decay)
