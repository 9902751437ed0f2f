"""Data-parallel replicas of the pipeline: R = D x S ranks run D copies of an S-stage pipeline.

Ranks sit in a replicas x stages grid (engine/placement.py). `train.batch_size` stays the *global* batch: replica r trains on the r-th 1/D slice of
every batch, so a run means the same thing whatever D is.

The D ranks that hold the same stage form a process group. Before every optimizer step (a
module's heads, then later its body: see [Note: step order] in stage.py) they average that
step's gradients in one flat all-reduce, together with a flag saying whether the step's loss
was finite on every replica, so that replicas always take (or skip) the same steps and their
weights stay identical. With `pipeline.sync_bn=true` the stage's BatchNorm layers also use
batch statistics over the whole global batch (a SyncBatchNorm that works on gloo and CPU, which
torch's own does not); then a lockstep D x S run equals the single process at the same global
batch. Without it each replica normalises with its own slice's statistics, as DDP does.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from pipemlaan.engine.flat import flatten, unflatten


class GradSync:
    """Averages a step's gradients over the replicas of one stage, in one flat all-reduce on
    the stage's process group (named "stage:s" in engine/schedule.py). Its all-reduces (the
    batch norm's too) count as the "allreduce" part of the rank's step time (`clock`,
    engine/p2p.py StepClock)."""

    def __init__(self, comm, group: str, replicas: int, clock=None):
        self.comm, self.group, self.replicas = comm, group, replicas
        self.clock = clock

    def average(self, params: list[torch.Tensor], ok: torch.Tensor) -> torch.Tensor:
        """Replaces each parameter's gradient by the replicas' mean (a missing gradient counts
        as zero), in one all-reduce that also carries the step's flag. Returns whether every
        replica's step is ok, as a device tensor (never read on the host here: the optimizer
        skips on it, engine/updates.py [Note: non-finite on the device])."""
        had = [p.grad is not None for p in params]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        like = grads[0] if grads else torch.empty(0, device=ok.device)
        flag = (~ok).to(like.dtype).reshape(1)
        flat = flatten(grads + [flag])
        self.all_reduce(flat, "averaging gradients")
        all_ok = flat[-1] == 0
        flat.div_(self.replicas)
        for p, has, mean in zip(params, had, unflatten(flat, grads)):
            # every replica has the same parameters without a gradient (same structure):
            # they stay without one, so the optimizer skips them as in the single process
            if has:
                p.grad.copy_(mean)
        return all_ok

    def all_reduce(self, flat: torch.Tensor, what: str) -> None:
        with self.clock.measure("allreduce") if self.clock else nullcontext():
            self.comm.all_reduce(flat, self.group, f"{what} with this stage's replicas")


class _SyncBatchNormFn(torch.autograd.Function):
    """Batch norm over the union of the replicas' batches. Sums (never means) are all-reduced,
    so each replica's loss may be a mean over its own slice: the gradients then come out D times
    the global ones, which GradSync's average undoes."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, sync):
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = torch.tensor([xf.numel() // xf.shape[1]], dtype=xf.dtype, device=xf.device)
        stats = torch.cat([xf.sum(dims), count])
        sync.all_reduce(stats, "synchronising batch norm")
        n = stats[-1]
        mean = stats[:-1] / n
        centred = xf - mean.view(shape)
        sq = (centred * centred).sum(dims)     # two passes: as exact as native batch norm
        sync.all_reduce(sq, "synchronising batch norm")
        var = sq / n
        invstd = torch.rsqrt(var + eps)
        xhat = centred * invstd.view(shape)
        y = xhat * weight.view(shape) + bias.view(shape)
        unbiased = var * (n / (n - 1).clamp(min=1))
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.n, ctx.sync, ctx.dims, ctx.shape, ctx.dtype = n, sync, dims, shape, x.dtype
        ctx.mark_non_differentiable(mean, unbiased)
        return y.to(x.dtype), mean, unbiased

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        xhat, invstd, weight = ctx.saved_tensors
        dims, shape = ctx.dims, ctx.shape
        dy = dy.float()
        dbias = dy.sum(dims)
        dweight = (dy * xhat).sum(dims)
        sums = torch.cat([dbias, dweight])
        ctx.sync.all_reduce(sums, "synchronising batch norm gradients")
        c = dbias.numel()
        mean_dy, mean_dy_xhat = sums[:c] / ctx.n, sums[c:] / ctx.n
        dx = (weight * invstd).view(shape) * (dy - mean_dy.view(shape)
                                             - xhat * mean_dy_xhat.view(shape))
        return dx.to(ctx.dtype), dweight, dbias, None, None


class _ReplicaStats:
    """Batch norm whose training-mode statistics cover every replica's slice of the batch.
    Same parameters and buffers as the torch class, so checkpoints and LAM snapshots are
    unchanged."""

    sync: GradSync | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.sync is None or not self.affine:
            return super().forward(x)
        y, mean, var = _SyncBatchNormFn.apply(x, self.weight, self.bias, self.eps, self.sync)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                     else self.momentum)
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(var.to(self.running_var.dtype), alpha=m)
        return y


class ReplicaBatchNorm(_ReplicaStats, nn.BatchNorm2d):
    pass


class ReplicaBatchNorm1d(_ReplicaStats, nn.BatchNorm1d):
    """(the reference DGL* head's fully connected layers)"""


_REPLICA_CLASS = {nn.BatchNorm2d: ReplicaBatchNorm, nn.BatchNorm1d: ReplicaBatchNorm1d}


def sync_batch_norm(module: nn.Module, sync: GradSync) -> int:
    """Turns every BatchNorm2d / BatchNorm1d under `module` into its replica version in place
    (sharing its parameters and buffers). Returns how many were converted."""
    n = 0
    for bn in module.modules():
        if type(bn) in _REPLICA_CLASS:
            bn.__class__ = _REPLICA_CLASS[type(bn)]
            bn.sync = sync
            n += 1
        elif isinstance(bn, _ReplicaStats):
            bn.sync = sync
    return n
