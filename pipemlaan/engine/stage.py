"""A stage: the contiguous run of local modules one rank owns, and the one order of a step.

The single-process trainer is a stage that owns every module; a pipeline rank is a stage that
owns some. Both run exactly this code, which is why lockstep pipelines equal the single
process (see [Note: step order]).

[Note: step order] For batch t, modules are visited in increasing index k:
  1. forward the body on the detached input (a leaf that needs grad only if some window's
     gradient goes on past module k);
  2. heads g_k and h_k run on detached copies of the output; their objective is back-propagated
     at once, the head parameters take their optimizer step (lr of step t), and the gradients at
     the two copies are kept: g's as module k's own, h's as window k's;
  3. a window gradient arriving at module k (its own window k, or window j > k pulled back from
     module k+1, possibly from the next rank) is pulled back through module k's body to its
     input at once (retain_graph) when the window goes on past k; the result arrives at k-1;
  4. when every window covering module k has arrived, module k finalises: the body is
     back-propagated with (g gradient + window gradients in increasing window index), the body
     takes its optimizer step (lr of step t) and the graph is freed.
The sums are taken in a fixed order, never in arrival order, so a pipeline that delivers
window gradients later gives bit-identical results. With data-parallel replicas every optimizer
step of 2. and 4. first averages its gradients over the stage's replicas (engine/replicas.py);
the step order is the same on every replica, so their collectives always pair up. EMA twins move at the start of a step
(engine/lam.py), before any forward.

In async mode a module whose windows end on a later rank finalises batch t only after the
next batches went through its forward. Those modules run their body on a clone of their
parameters ("weight stashing"), so the optimizer's in-place steps never touch a graph that
is still waiting for its backward.

[Note: emulated staleness] `emulate=(partition, M)` makes a single-process stage behave as an
async pipeline with that partition and M batches in flight would: a window gradient that
crosses a boundary of the partition is held and reaches the module before it only after that
stage's forward of batch t+M-1 (where the pipeline's rank receives G(t)), the modules waiting
for it stash their weights, and `flush_delayed` delivers what is still held at the end of a
run of steps (the pipeline's drain). Each emulated rank then runs the same operations, in the
same order, on the same inputs as the real one (the LAM lag is engine/lam.py's part), so the
two runs match: what an async pipeline loses against the single process is staleness.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch.func import functional_call

from pipemlaan.config import Config
from pipemlaan.engine.compiled import compile_modules
from pipemlaan.errors import PipemlaanError
from pipemlaan.engine.updates import Updates
from pipemlaan.local.module import LocalModule, WindowPlan


class NonFiniteLoss(PipemlaanError):
    """A module's loss became NaN or Inf."""


@dataclass
class _Pending:
    step: int
    lr: float
    inp: torch.Tensor
    out: torch.Tensor
    g_grad: torch.Tensor | None = None
    windows: dict[int, torch.Tensor] = field(default_factory=dict)
    local_done: bool = False       # [Note: local first]: its own losses' part is back-propagated


class Stage:
    def __init__(self, cfg: Config, modules: list[LocalModule], plan: WindowPlan,
                 device: torch.device, stash: bool = False, saved_tracker=None,
                 grad_sync=None, emulate: tuple[list[int], int] | None = None):
        self.cfg = cfg
        on_cuda = device.type == "cuda"
        self._channels_last = on_cuda and cfg.train.channels_last
        if self._channels_last:
            for m in modules:      # once, weights and heads: every conv then runs NHWC
                m.to(memory_format=torch.channels_last)
        # train.compile: inductor's kernels for each module's body and heads (None = eager)
        self.compiled = compile_modules(cfg, modules, device)
        self.plan = plan
        self.device = device
        self.modules = {m.index: m for m in modules}
        self.indices = [m.index for m in modules]
        self.first, self.last = self.indices[0], self.indices[-1]
        self.updates = Updates(cfg, modules, device, grad_sync)
        self.optimizers = self.updates.optimizers
        # windows this stage must receive from the next rank / send to the previous one
        self.from_next = [j for j in plan.covering(self.last) if j > self.last]
        self.to_prev = ([j for j in plan.covering(self.first - 1) if j >= self.first]
                        if self.first > 0 else [])
        # the last module of each (real or emulated) pipeline stage: windows past it wait
        stage_last = {k: self.last for k in self.indices}
        self._held_at: set[int] = set()         # [Note: emulated staleness]
        self._delay = 0
        self._held: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
        if emulate is not None:
            counts, self._delay = emulate[0], emulate[1] - 1
            ends = [sum(counts[:i + 1]) - 1 for i in range(len(counts))]
            stage_last = {k: next(e for e in ends if e >= k) for k in self.indices}
            # pipeline.emulate_delay=lam: the LAM lag alone (engine/lam.py), no held gradient
            window = cfg.pipeline.emulate_delay != "lam"
            self._held_at = set(ends[:-1]) if self._delay and window else set()
            stash = stash or bool(self._held_at)
        self.stashed = {k for k in self.indices
                        if stash and any(j > stage_last[k] for j in plan.covering(k))}
        # [Note: local first] the windows of each stashed module that come from a later rank,
        # steps between a batch's forward and their arrival, and a deferred local part per
        # module: (finite flag, lr, step) of the local gradient waiting in .grad
        self._late = {k: [j for j in plan.covering(k) if j > stage_last[k]]
                      for k in self.stashed} if cfg.pipeline.local_first else {}
        self._lag = self._delay if emulate is not None else cfg.pipeline.in_flight - 1
        self._waiting: dict[int, tuple[torch.Tensor, float, int]] = {}
        # [Note: weight prediction] steps by which a stashed module's update lags its forward
        self._ahead = ((self._delay if emulate is not None else cfg.pipeline.in_flight - 1)
                       if cfg.pipeline.predict_weights and cfg.train.momentum > 0 else 0)
        if self._lag > 0:      # [Note: stale steps]
            for k in self.stashed:
                self.updates.retune_body(k, cfg.pipeline.stale_lr, cfg.pipeline.stale_momentum)
        self.pending: dict[tuple[int, int], _Pending] = {}
        self.losses: dict[int, torch.Tensor] = {}
        self.tracker = saved_tracker
        self._upstream: dict[int, torch.Tensor] = {}
        self._bf16 = on_cuda and cfg.train.bf16
        self._autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                          if self._bf16 else nullcontext())

    def use_device_scalars(self) -> None:
        """[Note: device scalars] (engine/updates.py); the autocast weight cache is off too
        (the graph must not keep casts made outside it; each weight is cast once per step
        either way)."""
        self.updates.use_device_scalars()
        if self._bf16:
            self._autocast = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)

    def set_scalars(self, step: int, lr: float) -> None:
        self.updates.set_scalars(step, lr)

    # ---- training -------------------------------------------------------------------------
    def train_step(self, step: int, lr: float, x: torch.Tensor, labels: torch.Tensor,
                      images: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Runs batch `step` through every owned module (steps 1-4 of the note). Returns the
        boundary activation for the next rank and the window gradients for the previous one."""
        self._upstream = {}
        track = self.tracker.track() if self.tracker else nullcontext()
        with track:
            for k in self.indices:
                x = self._forward_module(k, step, lr, x, labels, images)
                if k in self._held_at:
                    self._deliver(step - self._delay, k)
        missing = [j for j in self.to_prev if j not in self._upstream]
        assert not missing, f"windows {missing} did not reach module {self.first}"
        return x.detach(), [self._upstream.pop(j) for j in self.to_prev]

    def receive_grads(self, step: int, grads: list[torch.Tensor]) -> None:
        """Window gradients from the next rank for batch `step`, at our last module's output."""
        for j, g in zip(self.from_next, grads):
            self._arrive(step, self.last, j, g)

    def _deliver(self, step: int, k: int) -> None:
        for j, grad in sorted(self._held.pop((step, k), []), key=lambda item: item[0]):
            self._arrive(step, k, j, grad)

    def flush_delayed(self) -> None:
        """Delivers every held window gradient, oldest batch first ([Note: emulated
        staleness]: the drain at the end of a run of steps)."""
        for step, k in sorted(self._held):
            self._deliver(step, k)

    def unfinished(self) -> list[int]:
        """Batches some module is still waiting on (oldest first)."""
        return sorted({t for t, _ in self.pending})

    def _forward_module(self, k: int, step: int, lr: float, x: torch.Tensor,
                        labels: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
        mod = self.modules[k]
        inp = x.detach()
        if self._channels_last and inp.dim() == 4:     # token activations (ViTs) are 3-D
            inp = inp.contiguous(memory_format=torch.channels_last)
        if self.plan.needs_input_grad(k):
            inp.requires_grad_(True)
        with torch.profiler.record_function(f"module {k} forward"), self._autocast:
            if k in self.stashed:
                params = self._stash(k, mod, lr)
                out = functional_call(mod.body, params, (inp,))
            else:
                out = mod.body(inp)
        pend = _Pending(step, lr, inp, out)
        self.pending[(step, k)] = pend

        # Each head runs and back-propagates on its own detached copy of the output, one
        # after the other, so only one head's graph is alive at a time (the gradients are the
        # same as for the summed objective: the heads share no tensor that needs grad).
        weights = self._head_weights(mod)
        grads, total = [], None
        for head, w in ((mod.g, weights[0]), (mod.h, weights[1])):
            if head is None:
                grads.append(None)
                continue
            z = out.detach().requires_grad_(True)
            with torch.profiler.record_function(f"module {k} heads"), self._autocast:
                part = w * head(z, labels, images)[0]
            part.backward()
            total = part.detach() if total is None else total + part.detach()
            grads.append(z.grad)
        if total is None:      # no loss of its own: it learns through later windows only
            g_grad = h_grad = None
        else:
            self.losses[k] = total
            # head parameters only: the body has no gradient yet
            ok = self.updates.heads(k, torch.isfinite(total), lr, step)
            # a skipped batch contributes zero gradients: the window bookkeeping (and the
            # stream to the previous rank) goes on, and nothing non-finite travels upstream
            g_grad, h_grad = (None if g is None else g.masked_fill_(~ok, 0.0) for g in grads)
        pend.g_grad = g_grad
        if h_grad is not None:
            self._arrive(step, k, k, h_grad)
        else:
            self._maybe_finalize(step, k)
        return out

    # [Note: stale steps] A gradient taken a step before it is applied makes momentum SGD
    # unstable at a far smaller learning rate (on a quadratic, Nesterov 0.9: lr x curvature
    # below 0.26 instead of 1.36), so pipeline.stale_lr and pipeline.stale_momentum retune the
    # body's step of each module whose update comes late (the stashed ones, when batches are in
    # flight). Heads step at once and keep train's settings; the emulation retunes the same
    # modules, so it still equals the pipeline.

    # [Note: weight prediction] A stashed module's update for batch t lands `_ahead` steps
    # after its forward of t, so its gradient is taken at weights that many updates old. With
    # pipeline.predict_weights the forward runs on w - ahead * lr * v (v: the momentum buffer,
    # the direction the pending updates take; SpecTrain, Chen et al. 2018), and the gradient
    # (which passes through the prediction unchanged) is applied to w as always.
    def _stash(self, k: int, mod: LocalModule, lr: float) -> dict[str, torch.Tensor]:
        if not self._ahead:
            return {n: p.clone() for n, p in mod.body.named_parameters()}
        opt = self.optimizers[k]
        scale = -self._ahead * lr * self.updates.body_group(k)["lr_mult"]
        return {n: torch.add(p, opt.state[p]["momentum_buffer"], alpha=scale)
                for n, p in mod.body.named_parameters()}

    def _head_weights(self, mod: LocalModule) -> tuple[float, float]:
        if mod.g is not None and mod.h is not None:
            return self.cfg.method.w_g, self.cfg.method.w_h
        return 1.0, 1.0

    def _arrive(self, step: int, k: int, j: int, grad: torch.Tensor) -> None:
        pend = self.pending[(step, k)]
        pend.windows[j] = grad
        if self.plan.continues_past(j, k):
            with torch.profiler.record_function(f"module {k} window {j} backward"):
                (back,) = torch.autograd.grad(pend.out, pend.inp, grad, retain_graph=True)
            if k - 1 in self._held_at:
                self._held.setdefault((step, k - 1), []).append((j, back))
            elif k - 1 in self.modules:
                self._arrive(step, k - 1, j, back)
            else:
                self._upstream[j] = back
        self._maybe_finalize(step, k)

    def _maybe_finalize(self, step: int, k: int) -> None:
        pend = self.pending.get((step, k))
        if pend is not None and k in self._late:
            self._finalize_apart(step, k, pend)
            return
        if pend is None or set(pend.windows) != set(self.plan.covering(k)):
            return
        total = pend.g_grad
        for j in sorted(pend.windows):
            total = pend.windows[j] if total is None else total + pend.windows[j]
        with torch.profiler.record_function(f"module {k} backward"):
            torch.autograd.backward(pend.out, total, inputs=self.updates.body_params[k])
        self.updates.body(k, torch.isfinite(total).all(), pend.lr, step)
        del self.pending[(step, k)]

    # [Note: local first] With pipeline.local_first, a stashed module back-propagates its own
    # losses' gradient (g and the windows that close on its rank) as soon as they are there,
    # keeping the graph for the late windows, and takes its optimizer step for batch t with
    # that local gradient and the late windows of batch t-M+1, which arrive during step t
    # (local first in .grad, then the late part: one order, in the pipeline and emulated).
    # So its own losses are never stale, the late windows are M-1 steps old as before, and a
    # step costs one more backward of the module's body. At the ends of a run of steps: a
    # batch with no late window due (the fill) steps with its local gradient alone, and a late
    # window with no batch left (the drain) steps alone.
    def _finalize_apart(self, step: int, k: int, pend: _Pending) -> None:
        late = self._late[k]
        if not pend.local_done:
            if any(j not in pend.windows for j in self.plan.covering(k) if j not in late):
                return
            pend.local_done = True
            total = pend.g_grad
            for j in sorted(j for j in pend.windows if j not in late):
                total = pend.windows[j] if total is None else total + pend.windows[j]
            if total is not None:
                with torch.profiler.record_function(f"module {k} local backward"):
                    torch.autograd.backward(pend.out, total, inputs=self.updates.body_params[k],
                                            retain_graph=True)
                local = (torch.isfinite(total).all(), pend.lr, step)
                if (step - self._lag, k) in self.pending:    # its late windows come this step
                    self._waiting[k] = local
                else:
                    self.updates.body(k, *local)
        if any(j not in pend.windows for j in late):
            return
        total = None
        for j in late:
            total = pend.windows[j] if total is None else total + pend.windows[j]
        with torch.profiler.record_function(f"module {k} backward"):
            torch.autograd.backward(pend.out, total, inputs=self.updates.body_params[k])
        finite = torch.isfinite(total).all()
        if k in self._waiting:
            ok, lr, at = self._waiting.pop(k)
            self.updates.body(k, finite & ok, lr, at)
        else:
            self.updates.body(k, finite, pend.lr, step)
        del self.pending[(step, k)]

    @property
    def skipped(self) -> dict[int, int]:
        return self.updates.skipped

    def first_nonfinite(self) -> tuple[int, int] | None:
        return self.updates.first_nonfinite()

    def discard_step(self) -> None:
        """Forgets a step that never ran on the device (a failed CUDA graph capture)."""
        self.pending.clear()
        self._waiting.clear()
        self.losses = {}
        self.updates.zero_grad()

    # ---- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def eval_batch(self, x: torch.Tensor, labels: torch.Tensor, images: torch.Tensor | None
                   ) -> tuple[torch.Tensor, dict[int, list[int]]]:
        """Forward in eval mode. Returns the boundary activation and, per owned module with a
        head, the [top-1 correct, top-5 correct] counts of its report head (h if it has one,
        else g)."""
        counts = {}
        with self._autocast:
            for k in self.indices:
                mod = self.modules[k]
                x = mod.body(x)
                head = mod.h if mod.h is not None else mod.g
                if head is None:
                    continue
                _, logits = head(x, labels, images)
                top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
                hit = top == labels[:, None]
                counts[k] = [int(hit[:, 0].sum()), int(hit.any(dim=1).sum())]
        return x, counts

    def train(self, mode: bool = True) -> None:
        for m in self.modules.values():
            m.train(mode)
            if m.twin is not None:
                m.twin.train(mode)
