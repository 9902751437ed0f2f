"""The unit a rank owns: one local module with its heads, its optimizer, and the cascade plan.

[Note: window plan] Module j may carry a head h_j whose loss ("window j") trains the `reach`
modules j-reach+1..j (MLM: reach = method.window; LAM alone: reach = 1, the leap head sits on
module j alone). Windows exist for j >= window-1 under MLM, for every non-last module under LAM
alone, and always for the last module, whose h is the network's own classifier. Every
non-last module also has an independent head g_j, which trains module j alone. A module's
objective is `w_g * L(g) + w_h * L(h)` when it has both, else the one loss at weight 1.
End-to-end BP is a single module whose h is the classifier.

`build_local_modules` builds the full network on every rank from the seed, so every rank holds
identical initial weights and LAM copies equal the live blocks they copy.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import nn

from pipemlaan.config import Config
from pipemlaan.data import DatasetSpec
from pipemlaan.local.heads import ClassifierHead, DGLHead, InfoProHead, LeapHead, LinearHead
from pipemlaan.models import build_backbone
from pipemlaan.models.resnet import Backbone
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

    def max_reach(self) -> int:
        return max(self.reach)


def window_plan(cfg: Config, K: int) -> WindowPlan:
    m = cfg.method
    if m.name == "bp":
        return WindowPlan(1, (1,))
    W = m.window if m.mlm else 1
    reach = []
    for j in range(K):
        if j == K - 1:
            reach.append(min(W, K))
        elif m.mlm:
            reach.append(W if j >= W - 1 else 0)
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
    engine/stage.py [Note: non-finite on the device]). Momentum buffers start at zero: the
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


def _head_width(cfg: Config, channels: int) -> int:
    return cfg.method.head_width or channels


def _small_head(cfg: Config, spec: DatasetSpec, cin: int, depth: float) -> nn.Module:
    """The independent head kind named by method.name, at relative depth `depth` in [0, 1]."""
    m = cfg.method
    if m.name == "linear":
        return LinearHead(cin, spec.num_classes)
    if m.name == "dgl":
        return DGLHead(cin, spec.num_classes, _head_width(cfg, cin))
    r0, r1 = m.infopro_recon
    c0, c1 = m.infopro_ce
    return InfoProHead(cin, spec.num_classes, _head_width(cfg, cin), spec.in_channels, spec.mean,
                       spec.std, r0 + (r1 - r0) * depth, c0 + (c1 - c0) * depth)


# Building seeds the global RNG and draws from it: ranks that are threads of one process
# (tests/inprocess.py) must build one at a time to get identical weights.
_BUILD_LOCK = threading.Lock()


def build_local_modules(cfg: Config, spec: DatasetSpec) -> tuple[Backbone, list[LocalModule]]:
    """Cuts the seeded backbone into K local modules and attaches their heads."""
    with _BUILD_LOCK:
        return _build(cfg, spec)


def _build(cfg: Config, spec: DatasetSpec) -> tuple[Backbone, list[LocalModule]]:
    torch.manual_seed(cfg.train.seed)
    backbone = build_backbone(cfg.model.name, spec.in_channels, spec.num_classes, cfg.model.width)
    K = 1 if cfg.method.name == "bp" else cfg.model.K
    ranges = module_ranges(backbone, K)
    plan = window_plan(cfg, K)
    modules = []
    for i, (first, last) in enumerate(ranges):
        blocks = backbone.blocks[first:last + 1]
        cout = backbone.info[last].out_channels
        depth = i / max(K - 2, 1)
        g = None if i == K - 1 else _small_head(cfg, spec, cout, depth)
        h, twin_source = None, None
        if i == K - 1:
            h = ClassifierHead(backbone.classifier)
        elif plan.reach[i]:
            if cfg.method.lam:
                src = lam_copies(backbone, ranges, i)
                h = LeapHead([backbone.blocks[b] for b in src], spec.num_classes,
                             backbone.info[src[-1]].out_channels)
                twin_source = src[0]
            else:
                h = _small_head(cfg, spec, cout, depth)
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
