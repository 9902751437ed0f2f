"""What one training step of each local module costs, counted rather than timed.

[Note: counted costs] The automatic partition (engine/partition.py) balances stages by these
costs. They are counted from the modules' shapes, so every rank computes the same figures
without timing anything and without holding another rank's weights on its device, and the same
command always splits the model the same way whatever else the machine is doing (a timed
partition moved with the load: two runs of one command trained different pipelines).

Per image, for a module's body and its heads (g, h: leap copies included), one forward pass
at batch 1 on the host counts
  - multiply-adds of every convolution and linear layer, and of every attention layer as a
    whole (its projections and the two attention products: flops.layer_macs);
  - elements written by every leaf layer (convolution, batch norm, ReLU, pooling, ...): the
    memory traffic that dominates the cheap layers (an attention layer counts its output,
    not its L x L attention weights);
  - leaf layers run: a fixed cost per operator (kernel launch, dispatcher).
A training step runs each forward, then a backward that costs about twice as much (gradients of
inputs and of weights), so step seconds = 3 x (2 x MACs / F + 4 bytes x elements / B + ops x L)
x (images for MACs and elements). F, B and L are per device kind (`CALIBRATION`); only their
ratios matter for the partition. `benchmarks/partition_fit.py` fits and checks them against
timed modules and real pipeline stages (docs/distributed.md "How the model is split").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipemlaan.flops import layer_macs

# (FLOP/s, bytes/s, seconds per operator) of a training step, per device kind. CPU: fitted by
# benchmarks/partition_fit.py on this project's 2-core machine (one thread per rank, fp32;
# benchmarks/results/partition-fit-cpu-2026-12-03-2344.md). CUDA: not fitted on a GPU yet (none
# was at hand): an H100's dense bf16 rate at the third of it small convolutions reach, its HBM
# bandwidth at 60%, and 10 us per operator (eager launches).
CALIBRATION = {
    "cpu": (9.0e10, 2.3e9, 3.2e-4),
    "cuda": (3.0e14, 2.0e12, 1.0e-5),
}

_LEAVES = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.AdaptiveAvgPool2d,
           nn.AvgPool2d, nn.MaxPool2d, nn.Upsample, nn.ConvTranspose2d, nn.Sigmoid, nn.Dropout,
           nn.Flatten, nn.LayerNorm, nn.GELU, nn.MultiheadAttention)


@dataclass(frozen=True)
class ModuleCost:
    """Counts per image of one module's training work (its body and its heads)."""

    macs: int          # multiply-adds of the forward pass
    elements: int      # elements written by leaf layers in the forward pass
    ops: int           # leaf layers run in the forward pass

    def seconds(self, batch: int, device_kind: str) -> float:
        """Predicted seconds of one training step (forward + backward) at `batch` images."""
        flops, bandwidth, per_op = CALIBRATION.get(device_kind, CALIBRATION["cuda"])
        return 3 * (2 * self.macs * batch / flops + 4 * self.elements * batch / bandwidth
                    + self.ops * per_op)


def count_module_costs(modules, image_shape: tuple[int, ...]) -> list[ModuleCost]:
    """ModuleCost of every module, counted with one image of label 0 wherever the module's
    weights are (the host, at start-up). Modules run in eval mode, so no running statistic
    moves, and get their training mode back."""
    totals = {"macs": 0, "elements": 0, "ops": 0}

    def hook(layer, _inp, out):
        if isinstance(out, tuple):      # nn.MultiheadAttention: (output, weights or None)
            out = out[0]
        if torch.is_tensor(out):
            totals["macs"] += layer_macs(layer, out)
            totals["elements"] += out.numel()
            totals["ops"] += 1

    costs = []
    images = torch.zeros(1, *image_shape)
    labels = torch.zeros(1, dtype=torch.long)
    x = images
    for mod in modules:
        device = next(mod.parameters()).device
        handles = [m.register_forward_hook(hook) for m in mod.modules() if isinstance(m, _LEAVES)]
        was_training = mod.training
        mod.eval()
        try:
            for k in totals:
                totals[k] = 0
            with torch.no_grad():
                out = mod.body(x.to(device))
                for head in (mod.g, mod.h):
                    if head is not None:
                        head(out, labels.to(device), images.to(device))
        finally:
            mod.train(was_training)
            for h in handles:
                h.remove()
        costs.append(ModuleCost(**totals))
        x = out.detach().to("cpu").float()
    return costs


def predicted_seconds(modules, image_shape: tuple[int, ...], batch: int, device_kind: str
                      ) -> list[float]:
    """Each module's predicted seconds per training step at `batch` images on `device_kind`:
    what the automatic partition balances (the trainer's and pipemlaan.profile's alike)."""
    return [c.seconds(batch, device_kind) for c in count_module_costs(modules, image_shape)]
