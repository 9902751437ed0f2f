"""Tests of the local-learning core: gradient routing of one step against plain autograd, the
EMA twin of LAM, LAM copies at build time, and that a short run lowers every module's loss.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_local.py -q
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from pipemlaan.config import load_config
from pipemlaan.data import dataset_spec, load_datasets
from pipemlaan.engine.lam import LamSync
from pipemlaan.engine.placement import Placement
from pipemlaan.engine.stage import Stage
from pipemlaan.local.heads import LeapHead
from pipemlaan.local.module import block_state, build_local_modules, ema_update, window_plan
from pipemlaan.models.split import lam_copies, module_ranges

CPU = torch.device("cpu")
IMAGE = [1, 8, 8]


def make_cfg(method: str = "dgl", *, mlm: bool = False, lam: bool = False, window: int = 2,
             model: str = "resnet14", K: int = 4, image=IMAGE, extra: tuple = ()):
    return load_config(None, [
        f"model.name={model}", f"model.K={K}", f"method.name={method}",
        f"method.mlm={str(mlm).lower()}", f"method.lam={str(lam).lower()}",
        f"method.window={window}", "data.name=synthetic", "data.synthetic_size=256",
        f"data.synthetic_image={list(image)}", "train.device=cpu", *extra])


METHODS = {
    "bp": dict(method="bp"),
    "dgl": dict(method="dgl"),
    "dgl+mlm-w2": dict(method="dgl", mlm=True, window=2),
    "dgl+mlm-w3": dict(method="dgl", mlm=True, window=3),
    "dgl+lam": dict(method="dgl", lam=True),
    "dgl+mlaan": dict(method="dgl", mlm=True, lam=True, window=2),
    "infopro+mlaan": dict(method="infopro", mlm=True, lam=True, window=2),
    # resnet14 has 6 blocks: K=7 puts the stem in a module of its own
    "dgl+mlaan-w3-stem": dict(method="dgl", mlm=True, lam=True, window=3, K=7),
    "linear+mlaan-stem": dict(method="linear", mlm=True, lam=True, window=2, K=7),
    "dgl+mlaan-stem-first-heads": dict(method="dgl", mlm=True, lam=True, window=2, K=7,
                                       extra=("method.first_modules_head=true",)),
    "dgl+mlm-compact": dict(method="dgl", mlm=True, window=2,
                            extra=("method.heads=compact",)),
}
BLOCKS = 6   # resnet14


# ---- the independent oracle ------------------------------------------------------------------

def first_window(cfg, K: int) -> int:
    """Where the first MLM window closes: as the reference code, after window-1 modules, one
    module later when the stem is its own (the reference merges it into its first module)."""
    m = cfg.method
    if not m.mlm:
        return 0
    return m.window - 1 + (1 if K == BLOCKS + 1 and not m.first_modules_head else 0)


def expected_windows(cfg, K: int) -> dict[int, int]:
    """Window j -> first module it trains, from the method's description (not WindowPlan)."""
    m = cfg.method
    if m.name == "bp":
        return {0: 0}
    W = m.window if m.mlm else 1
    lead = first_window(cfg, K)
    wins = {}
    for j in range(K):
        if j == K - 1:
            wins[j] = 0 if j <= lead else j - W + 1   # the network's classifier
        elif m.mlm and j >= lead:
            wins[j] = 0 if j == lead else j - W + 1  # the first window reaches the stem
        elif not m.mlm and m.lam:
            wins[j] = j                          # leap head on module j alone
    return wins


def expected_g(cfg, K: int, k: int) -> bool:
    """Every non-last module has an independent head, except (by default) those before the
    first window."""
    m = cfg.method
    return k != K - 1 and (m.first_modules_head or k >= first_window(cfg, K))


def trainable(module: nn.Module | None) -> list[torch.Tensor]:
    return [] if module is None else [p for p in module.parameters() if p.requires_grad]


def loss_of(head, z, y, images):
    return head(z, y, images)[0]


class Oracle:
    """Per-module gradients of the MLAAN objective by plain autograd on a copy of the modules."""

    def __init__(self, mods, cfg, x, y, images):
        self.mods, self.cfg, self.y, self.images = mods, cfg, y, images
        self.K = len(mods)
        self.wins = expected_windows(cfg, self.K)
        self.inputs = [x]
        with torch.no_grad():
            for m in mods[:-1]:
                self.inputs.append(m.body(self.inputs[-1]))

    def chain(self, a: int, b: int, detach: bool = True) -> torch.Tensor:
        """Output of module b computed from module a's input (detached)."""
        z = self.inputs[a].detach() if detach else self.inputs[a]
        for i in range(a, b + 1):
            z = self.mods[i].body(z)
        return z

    def coefs(self, k: int) -> tuple[float, float]:
        """(weight of L(g_k), weight of L(h_k)) in module k's objective."""
        m, mod = self.cfg.method, self.mods[k]
        both = mod.g is not None and mod.h is not None
        return (m.w_g if both else 1.0), (m.w_h if both else 1.0)

    def objective(self, k: int, *, leak: bool = False, drop_windows: bool = False,
                  unweighted: bool = False) -> torch.Tensor:
        mod, out = self.mods[k], self.chain(k, k)
        cg, ch = self.coefs(k)
        if unweighted:
            cg = ch = 1.0
        total = 0.0
        if mod.g is not None:
            total = total + cg * loss_of(mod.g, out, self.y, self.images)
        if mod.h is not None:
            total = total + ch * loss_of(mod.h, out, self.y, self.images)
        if not drop_windows:
            for j, first in self.wins.items():
                if j != k and first <= k < j:
                    total = total + self.coefs(j)[1] * loss_of(self.mods[j].h, self.chain(first, j),
                                                               self.y, self.images)
        if leak:   # a loss that must never reach module k (again): the next module's head,
            # g_{k+1} (or the classifier when k+1 is last), through an undetached chain
            nxt = self.mods[k + 1]
            head = nxt.g if nxt.g is not None else nxt.h
            total = total + loss_of(head, nxt.body(out), self.y, self.images)
        return total

    def body_grads(self, k: int, **variant) -> list[torch.Tensor]:
        params = trainable(self.mods[k].body)
        total = self.objective(k, **variant)
        if not torch.is_tensor(total):       # a module without a head, its windows dropped
            return [torch.zeros_like(p) for p in params]
        return list(torch.autograd.grad(total, params))

    def head_grads(self, k: int, which: str) -> list[torch.Tensor]:
        mod = self.mods[k]
        head = getattr(mod, which)
        out = self.chain(k, k).detach()
        c = self.coefs(k)[0 if which == "g" else 1]
        params = trainable(head)
        grads = torch.autograd.grad(c * loss_of(head, out, self.y, self.images), params,
                                    allow_unused=True)   # e.g. an InfoPro decoder at weight 0
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def all_close(a: list[torch.Tensor], b: list[torch.Tensor], rtol=1e-9, atol=1e-13) -> bool:
    assert len(a) == len(b) and len(a) > 0
    return all(torch.allclose(x, y, rtol=rtol, atol=atol) for x, y in zip(a, b))


def one_step(cfg, seed: int = 0):
    """Builds float64 modules, runs ONE Stage step at lr 1 without momentum or weight decay.
    Returns (modules before the step, modules after, the oracle on the 'before' copy)."""
    spec = dataset_spec(cfg.data)
    _, mods = build_local_modules(cfg, spec)
    for m in mods:
        m.double()
    before = copy.deepcopy(mods)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, spec.in_channels, *spec.image_size, generator=g, dtype=torch.float64)
    y = torch.randint(0, spec.num_classes, (8,), generator=g)
    images = x.clone()
    stage = Stage(cfg, mods, window_plan(cfg, len(mods)), CPU)
    stage.train_step(0, 1.0, x, y, images)
    oracle = Oracle(copy.deepcopy(before), cfg, x, y, images)
    return before, mods, oracle


def deltas(before: nn.Module, after: nn.Module) -> list[torch.Tensor]:
    return [(p0 - p1).detach() for p0, p1 in zip(trainable(before), trainable(after))]


NO_MOMENTUM = ("train.momentum=0", "train.weight_decay=0", "train.lr=1.0")


def with_extra(kw: dict, extra: tuple) -> dict:
    return {**kw, "extra": tuple(kw.get("extra", ())) + extra}


@pytest.mark.parametrize("label", list(METHODS))
def test_gradient_routing_matches_autograd(label):
    cfg = make_cfg(**with_extra(METHODS[label], NO_MOMENTUM))
    before, after, oracle = one_step(cfg)
    K = len(after)
    assert K == (1 if label == "bp" else METHODS[label].get("K", 4))
    # structure: g where the method description puts one, h exactly where a window ends
    for k, mod in enumerate(after):
        assert (mod.g is not None) == expected_g(cfg, K, k), k
        assert (mod.h is not None) == (k in oracle.wins), k
    discriminated = 0
    for k in range(K):
        got = deltas(before[k].body, after[k].body)
        want = oracle.body_grads(k)
        assert all_close(got, want), f"{label}: module {k} body update != its objective's grad"
        # every parameter of every module learns (for bp: the stem, through the whole network)
        assert all(d.abs().sum() > 0 for d in got), f"{label}: module {k} has a frozen parameter"
        negatives = []
        if k + 1 < K and (before[k + 1].g is not None or before[k + 1].h is not None):
            negatives.append(dict(leak=True))
        if any(j != k and first <= k < j for j, first in oracle.wins.items()):
            negatives.append(dict(drop_windows=True))
        if before[k].g is not None and before[k].h is not None:
            negatives.append(dict(unweighted=True))
        for variant in negatives:
            wrong = oracle.body_grads(k, **variant)
            assert not all_close(got, wrong, rtol=1e-6, atol=1e-10), (label, k, variant)
            discriminated += 1
    if label != "bp":
        assert discriminated >= K - 1   # every non-last module was checked against a negative


@pytest.mark.parametrize("label", ["dgl", "dgl+mlm-w3", "dgl+mlaan", "infopro+mlaan", "bp",
                                   "dgl+mlaan-w3-stem"])
def test_heads_learn_only_from_their_own_loss(label):
    cfg = make_cfg(**with_extra(METHODS[label], NO_MOMENTUM))
    before, after, oracle = one_step(cfg)
    checked = 0
    for k in range(len(after)):
        for which in ("g", "h"):
            if getattr(after[k], which) is None:
                continue
            got = deltas(getattr(before[k], which), getattr(after[k], which))
            want = oracle.head_grads(k, which)
            assert all_close(got, want), f"{label}: head {which}_{k} update != its own loss grad"
            checked += 1
        h0, h1 = before[k].h, after[k].h
        if isinstance(h1, LeapHead):
            # (its BatchNorm running statistics do move: the twin runs in train mode)
            for t0, t1 in zip(h0.twin.parameters(), h1.twin.parameters()):
                assert torch.equal(t0, t1), "the EMA twin's weights moved without an EMA update"
            assert all(p.grad is None and not p.requires_grad for p in h1.twin.parameters())
    assert checked >= 1


# ---- EMA and LAM --------------------------------------------------------------------------

def test_ema_update_formula_on_params_and_float_buffers():
    torch.manual_seed(0)
    twin = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    live_mod = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with torch.no_grad():   # every float tensor differs between twin and live
        for t in itertools.chain(twin.parameters(), twin.buffers(), live_mod.parameters(),
                                 live_mod.buffers()):
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5)
    twin[1].num_batches_tracked.fill_(7)
    live_mod[1].num_batches_tracked.fill_(100)
    live = block_state(live_mod)
    old = {n: t.clone() for n, t in twin.state_dict().items()}
    new_live = dict(live_mod.state_dict())
    m = 0.75
    ema_update(twin, live, m)
    for name, t in twin.state_dict().items():
        if t.is_floating_point():
            expect = m * old[name] + (1 - m) * new_live[name]
            torch.testing.assert_close(t, expect, rtol=1e-6, atol=1e-7, msg=name)
            assert not torch.equal(t, old[name]), name
        else:
            assert torch.equal(t, old[name]), f"{name} is not a float tensor and must not move"
    # decay 1 keeps the twin, decay 0 copies the live block
    ema_update(twin, live, 1.0)
    ema_update(twin, live, 0.0)
    for name, t in twin.state_dict().items():
        if t.is_floating_point():
            assert torch.equal(t, new_live[name]), name


def leap_modules(label: str = "dgl+mlaan", **kw):
    cfg = make_cfg(**{**METHODS[label], **kw})
    spec = dataset_spec(cfg.data)
    backbone, mods = build_local_modules(cfg, spec)
    return cfg, spec, backbone, mods


def test_twin_has_no_grad_but_passes_gradient_to_its_input():
    cfg, spec, _, mods = leap_modules()
    leaps = [m for m in mods if isinstance(m.h, LeapHead)]
    assert leaps
    for mod in leaps:
        head = mod.h
        assert all(not p.requires_grad for p in head.twin.parameters())
        # remove the trainable copy's contribution: only the twin is left on the path to fc
        hook = head.copies[0].register_forward_hook(lambda _m, _i, out: out * 0.0)
        x = torch.randn(4, spec.in_channels, *spec.image_size)
        with torch.no_grad():
            for m in mods[:mod.index + 1]:
                x = m.body(x)
        z = torch.randn_like(x).requires_grad_(True)
        y = torch.arange(z.shape[0]) % spec.num_classes
        loss, _ = head(z, y)
        loss.backward()
        hook.remove()
        assert z.grad is not None and z.grad.abs().sum() > 0, "no gradient through the twin"
        assert all(p.grad is None for p in head.twin.parameters())
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in head.copies[0].parameters())


def test_twin_gets_no_grad_in_a_stage_step_and_is_not_optimised():
    cfg, spec, _, mods = leap_modules()
    stage = Stage(cfg, mods, window_plan(cfg, len(mods)), CPU)
    for m in mods:
        if m.twin is not None:
            groups = stage.optimizers[m.index].param_groups
            opt_params = {id(p) for g in groups for p in g["params"]}
            assert not opt_params & {id(p) for p in m.twin.parameters()}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, spec.in_channels, *spec.image_size, generator=g)
    y = torch.randint(0, spec.num_classes, (8,), generator=g)
    stage.train_step(0, 0.1, x, y, None)
    twins = [m.twin for m in mods if m.twin is not None]
    assert twins
    for t in twins:
        assert all(p.grad is None and not p.requires_grad for p in t.parameters())


@pytest.mark.parametrize("kw", [dict(label="dgl+mlaan"), dict(label="dgl+lam"),
                                dict(label="dgl+mlaan", model="resnet32", K=8),
                                dict(label="dgl+lam", model="resnet32", K=16)])
def test_lam_copies_start_equal_to_live_blocks(kw):
    kw = dict(kw)
    label = kw.pop("label")
    cfg, _, backbone, mods = leap_modules(label, **kw)
    ranges = module_ranges(backbone, cfg.model.K)
    n = 0
    for i, mod in enumerate(mods):
        if not isinstance(mod.h, LeapHead):
            continue
        src = lam_copies(backbone, ranges, i)
        assert len(mod.h.copies) == len(src)
        assert mod.twin_source == src[0]
        for copy_block, b in zip(mod.h.copies, src):
            live = backbone.blocks[b]
            live_sd, copy_sd = live.state_dict(), copy_block.state_dict()
            assert list(live_sd) == list(copy_sd)
            for name in live_sd:
                assert torch.equal(live_sd[name], copy_sd[name]), (i, b, name)
            # a copy, not an alias of the live block
            assert all(p.data_ptr() != q.data_ptr()
                       for p, q in zip(live.parameters(), copy_block.parameters()))
        for (na, a), (nb, b) in zip(mod.h.twin.state_dict().items(),
                                    mod.h.copies[0].state_dict().items()):
            assert na == nb and torch.equal(a, b)
        n += 1
    assert n >= 1


def test_lam_sync_moves_twin_toward_live_block():
    cfg, spec, backbone, mods = leap_modules(extra=("method.ema_decay=0.9",))
    assert cfg.method.ema_decay == 0.9
    stage = Stage(cfg, mods, window_plan(cfg, len(mods)), CPU)
    live = dict(enumerate(backbone.blocks))
    lam = LamSync(cfg, 0, stage.modules, Placement.of([len(mods)], 1, mods), live,
                  total_steps=3)
    followers = [m for m in mods if m.twin is not None]
    assert followers
    # the live block a twin follows is the one the downstream module trains
    for m in followers:
        owning = [o for o in mods if o.block_range[0] <= m.twin_source <= o.block_range[1]]
        assert owning and owning[0].index > m.index
        assert any(b is backbone.blocks[m.twin_source] for b in owning[0].body)
    g = torch.Generator().manual_seed(2)
    m_ = cfg.method.ema_decay
    for t in range(3):
        x = torch.randn(16, spec.in_channels, *spec.image_size, generator=g)
        y = torch.randint(0, spec.num_classes, (16,), generator=g)
        twin_before = {m.index: [s.clone() for s in block_state(m.twin)] for m in followers}
        live_now = {m.index: [s.clone() for s in block_state(backbone.blocks[m.twin_source])]
                    for m in followers}
        lam.ema(t, {})
        for m in followers:
            after = block_state(m.twin)
            for a, b, l in zip(after, twin_before[m.index], live_now[m.index]):
                torch.testing.assert_close(a, m_ * b + (1 - m_) * l, rtol=1e-6, atol=1e-7)
            if t >= 1:   # the live block trained at step t-1, so the twin moved
                assert any(not torch.equal(a, b) for a, b in zip(after, twin_before[m.index]))
        stage.train_step(t, 0.1, x, y, None)


def test_ema_only_last_updates_only_the_last_twin():
    cfg, spec, backbone, mods = leap_modules(
        "dgl+lam", extra=("method.ema_decay=0.5", "method.ema_only_last=true"))
    stage = Stage(cfg, mods, window_plan(cfg, len(mods)), CPU)
    lam = LamSync(cfg, 0, stage.modules, Placement.of([len(mods)], 1, mods, ema_only_last=True),
                  dict(enumerate(backbone.blocks)), total_steps=2)
    followers = [m for m in mods if m.twin is not None]
    assert len(followers) >= 2
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, spec.in_channels, *spec.image_size, generator=g)
    y = torch.randint(0, spec.num_classes, (16,), generator=g)
    stage.train_step(0, 0.1, x, y, None)
    before = {m.index: [s.clone() for s in block_state(m.twin)] for m in followers}
    lam.ema(1, {})
    last = max(m.index for m in followers)
    for m in followers:
        moved = any(not torch.equal(a, b) for a, b in zip(block_state(m.twin), before[m.index]))
        assert moved == (m.index == last), m.index


# ---- a short run learns ------------------------------------------------------------------

LEARN = {
    "bp": dict(method="bp"),
    "dgl": dict(method="dgl"),
    "dgl+mlm": dict(method="dgl", mlm=True),
    "dgl+lam": dict(method="dgl", lam=True),
    "dgl+mlaan": dict(method="dgl", mlm=True, lam=True),
    "infopro": dict(method="infopro"),
    "infopro+mlaan": dict(method="infopro", mlm=True, lam=True),
    "linear": dict(method="linear"),
}


@pytest.mark.slow
@pytest.mark.parametrize("label", list(LEARN))
def test_short_run_lowers_every_module_loss(label):
    torch.manual_seed(0)
    cfg = make_cfg(**LEARN[label], model="resnet14", K=4, image=[1, 8, 8],
                   extra=("train.lr=0.1", "data.synthetic_size=320", "model.width=8"))
    spec = dataset_spec(cfg.data)
    _, mods = build_local_modules(cfg, spec)
    K = len(mods)
    stage = Stage(cfg, mods, window_plan(cfg, K), CPU)
    train, _, _ = load_datasets(cfg.data)
    bs, steps, history = 32, 36, []
    stream = (b for epoch in itertools.count() for b in
              train.batches(bs, epoch=epoch, seed=0, train=True))
    for t in range(steps):
        x, y = next(stream)
        stage.train_step(t, cfg.train.lr, x, y, x if cfg.method.name == "infopro" else None)
        history.append([float(stage.losses[k]) for k in sorted(stage.losses)])
    # modules before the first MLM window have no loss of their own
    have_loss = [k for k in range(K) if mods[k].g is not None or mods[k].h is not None]
    assert sorted(stage.losses) == have_loss and len(have_loss) >= K - 1
    hist = torch.tensor(history)
    assert torch.isfinite(hist).all()
    first, last = hist[:5].mean(0), hist[-5:].mean(0)
    for i, k in enumerate(have_loss):
        first_k, last_k = first[i], last[i]
        assert last_k < 0.9 * first_k, f"{label}: module {k} loss {first_k:.3f} -> {last_k:.3f}"


@pytest.mark.parametrize("local_first", [False, True])
def test_local_first_steps_a_late_module_on_its_own_losses_at_once(local_first):
    """engine/stage.py [Note: local first], one process emulating 4 ranks with 2 batches in
    flight: after batch 0, modules 0-2 (whose next window comes from the next rank) have moved
    by their own losses' gradient alone with pipeline.local_first, not at all without it; the
    late windows then complete the gradient of the whole objective, taken at the weights the
    forward used (the stashed ones)."""
    cfg = make_cfg(**METHODS["dgl+mlaan"], extra=NO_MOMENTUM + (
        "method.first_modules_head=true", "pipeline.in_flight=2",
        # the late bodies at train's lr, so a step is the gradient ([Note: stale steps] apart)
        "pipeline.stale_lr=1", f"pipeline.local_first={str(local_first).lower()}"))
    spec = dataset_spec(cfg.data)
    _, mods = build_local_modules(cfg, spec)
    for m in mods:
        m.double()
    before = copy.deepcopy(mods)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, spec.in_channels, *spec.image_size, generator=g, dtype=torch.float64)
    y = torch.randint(0, spec.num_classes, (8,), generator=g)
    stage = Stage(cfg, mods, window_plan(cfg, len(mods)), CPU, emulate=([1, 1, 1, 1], 2))
    stage.train_step(0, 1.0, x, y, None)
    oracle = Oracle(copy.deepcopy(before), cfg, x, y, None)
    for k in range(3):
        moved = deltas(before[k].body, mods[k].body)
        if local_first:
            assert all_close(moved, oracle.body_grads(k, drop_windows=True)), k
        else:
            assert all(d.abs().max() == 0 for d in moved), k
    assert all_close(deltas(before[3].body, mods[3].body), oracle.body_grads(3))
    stage.flush_delayed()       # the drain: the late windows arrive
    for k in range(4):
        assert all_close(deltas(before[k].body, mods[k].body), oracle.body_grads(k)), k
