"""A stage's optimizer steps: one SGD per module, each step guarded against non-finite values on
the device, averaged over the stage's replicas, with its learning rate and step number either
host floats or device scalars (for CUDA graphs).

Each module takes two steps per batch ([Note: step order] in engine/stage.py): its heads' right
after their losses (`heads`), its body's once every window covering it has arrived (`body`).

[Note: non-finite on the device] Whether a loss or gradient is finite is never read on the host
during a step (that would wait for the GPU): the flag stays a tensor, the fused optimizer skips
the update through its `found_inf` argument (the parameters and their momentum stay as they
were), and the module's first bad step and its count of skipped updates accumulate on the
device. The trainer reads them once per logging window (`first_nonfinite`): in stop mode the run
then ends naming module and step, at most a window late and with no non-finite weight written.

[Note: device scalars] A captured CUDA graph (engine/graphs.py) replays the kernels it recorded,
with the scalars they were given then. So in graph mode the learning rate of every parameter
group and the step number live in device tensors that the graph reads and that are written
before each step: one host-to-device copy of lr x lr_mult per group (the same float as eager
mode's, computed on the host) and one fill.
"""

from __future__ import annotations

import torch

from pipemlaan.config import Config
from pipemlaan.local.module import LocalModule, make_optimizer


class Updates:
    def __init__(self, cfg: Config, modules: list[LocalModule], device: torch.device,
                 grad_sync=None):
        self.device = device
        self.indices = [m.index for m in modules]
        self.grad_sync = grad_sync     # replicas.GradSync when the stage has replicas
        self.optimizers = {m.index: make_optimizer(m, cfg) for m in modules}
        # what each of a module's two steps updates (replicas average exactly these)
        self.head_params = {m.index: [p for head in (m.g, m.h) if head is not None
                                      for p in head.parameters() if p.requires_grad]
                            for m in modules}
        self.body_params = {m.index: [p for p in m.body.parameters() if p.requires_grad]
                            for m in modules}
        self._skips = {k: torch.zeros((), dtype=torch.long, device=device) for k in self.indices}
        self._first_bad = {k: torch.full((), -1, dtype=torch.long, device=device)
                           for k in self.indices}
        self._lr_dev: torch.Tensor | None = None
        self._step_dev: torch.Tensor | None = None
        self._lr_mults: list[float] = []

    def body_group(self, k: int) -> dict:
        """Module k's body's optimizer group (the first: LocalModule.param_groups)."""
        return self.optimizers[k].param_groups[0]

    def retune_body(self, k: int, lr_scale: float, momentum: float) -> None:
        """Module k's body steps with lr x lr_scale and, when momentum >= 0, that momentum
        ([Note: stale steps] in engine/stage.py)."""
        group = self.body_group(k)
        group["lr_mult"] *= lr_scale
        if momentum >= 0:
            group["nesterov"] = group["nesterov"] and momentum > 0
            group["momentum"] = momentum

    def heads(self, k: int, finite: torch.Tensor, lr: float, step: int) -> torch.Tensor:
        """Module k's heads take their step; returns whether it was taken (a device flag)."""
        return self._guarded_step(k, self.head_params[k], finite, lr, step)

    def body(self, k: int, finite: torch.Tensor, lr: float, step: int) -> torch.Tensor:
        """Module k's body takes its step (its gradients accumulated by the caller)."""
        return self._guarded_step(k, self.body_params[k], finite, lr, step)

    def _guarded_step(self, k: int, params: list[torch.Tensor], finite: torch.Tensor,
                      lr: float, step: int) -> torch.Tensor:
        """One optimizer step of module k over `params`, skipped on the device if the loss,
        a gradient, or (with replicas) any replica's is not finite. Returns that flag."""
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            norms = torch._foreach_norm(grads, float("inf"))
            finite = finite & torch.stack(norms).isfinite().all()
        if self.grad_sync is not None:
            with torch.profiler.record_function("replica gradient all-reduce"):
                finite = self.grad_sync.average(params, finite)
        opt = self.optimizers[k]
        if self._lr_dev is None:
            for group in opt.param_groups:
                group["lr"] = lr * group["lr_mult"]
        opt.found_inf = (~finite).to(torch.float32)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bad = ~finite
        # in place: a captured graph updates these very tensors on every replay
        self._skips[k].add_(bad)
        # where, not masked_fill_: with the graph's step tensor as its value that may read it
        # on the host
        first = self._first_bad[k]
        at = step if self._step_dev is None else self._step_dev
        first.copy_(torch.where(bad & (first < 0), at, first))
        return finite

    def zero_grad(self) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)

    # ---- what the trainer reads once per logging window ------------------------------------
    @property
    def skipped(self) -> dict[int, int]:
        """Updates skipped per module (reads the device)."""
        counts = torch.stack([self._skips[k] for k in self.indices]).tolist()
        return {k: int(n) for k, n in zip(self.indices, counts) if n}

    def first_nonfinite(self) -> tuple[int, int] | None:
        """(module, step) of the first update skipped because something was not finite, or
        None. One read of the device."""
        steps = torch.stack([self._first_bad[k] for k in self.indices]).tolist()
        bad = [(s, k) for k, s in zip(self.indices, steps) if s >= 0]
        return (min(bad)[1], min(bad)[0]) if bad else None

    # ---- [Note: device scalars] --------------------------------------------------------------
    def use_device_scalars(self) -> None:
        groups = [g for k in self.indices for g in self.optimizers[k].param_groups]
        self._lr_mults = [g["lr_mult"] for g in groups]
        self._lr_dev = torch.zeros(len(groups), device=self.device)
        for i, g in enumerate(groups):
            g["lr"] = self._lr_dev[i]
        self._step_dev = torch.zeros((), dtype=torch.long, device=self.device)

    def set_scalars(self, step: int, lr: float) -> None:
        """Writes step `step`'s learning rates and number where the device-scalar mode's
        kernels read them (never inside a captured graph)."""
        values = torch.tensor([lr * m for m in self._lr_mults], dtype=torch.float32,
                              pin_memory=self.device.type == "cuda")
        self._lr_dev.copy_(values, non_blocking=True)
        self._step_dev.fill_(step)
