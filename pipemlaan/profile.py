"""Memory per device, for any config: `python -m pipemlaan.profile --config X.toml --ranks 4`.

`profile_memory` runs a few training steps of the real stage code for every rank of an R-rank
pipeline inside one process (the stages hand activations and window gradients to each other
exactly as a lockstep pipeline does over P2P) and reports, per rank, the device-independent
accounting that metrics.py documents: peak bytes saved for backward + parameters, gradients,
buffers and optimizer state + the P2P receive buffers. `stage_alone` measures one rank's stage
alone on a device with real shapes (on CUDA: the allocator's peak, NVML's used memory, the
stage's median step time from CUDA events; benchmarks/projection.py turns such stage times into
projected images/s on N GPUs). The paper's Table 3 built on these: benchmarks/table3.py.

  python -m pipemlaan.profile --config configs/fmnist_mlaan_cpu.toml --ranks 2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from rich.table import Table

from pipemlaan.config import Config, load_config, method_label
from pipemlaan.data import DatasetSpec, dataset_spec
from pipemlaan.engine.costs import predicted_seconds
from pipemlaan.engine.partition import balanced_partition, stage_bounds, window_spans
from pipemlaan.engine.stage import Stage
from pipemlaan.errors import PipemlaanError
from pipemlaan.local.module import build_local_modules, output_shapes, window_plan
from pipemlaan.metrics import SavedTensorTracker, cuda_memory, state_bytes
from pipemlaan.ui import console

SHAPES = {"cifar": (3, 32, 32, 10), "imagenet": (3, 224, 224, 1000)}


def profile_memory(cfg: Config, spec: DatasetSpec, ranks: int, batch: int,
                   steps: int = 2, partition: list[int] | None = None) -> list[dict]:
    """Per-rank memory of an R-rank lockstep pipeline (R=1: the single process)."""
    torch.manual_seed(0)
    _, modules = build_local_modules(cfg, spec)
    plan = window_plan(cfg, len(modules))
    ranks = min(ranks, len(modules))
    shape = (spec.in_channels, *spec.image_size)
    x0 = torch.randn(batch, *shape)
    y0 = torch.randint(0, spec.num_classes, (batch,))
    if partition is None:
        if ranks == 1:
            partition = [len(modules)]
        else:
            # the partition a run of this config picks (engine/setup.py: counted costs)
            costs = predicted_seconds(modules, shape, batch, "cpu")
            partition = balanced_partition(costs, ranks, window_spans(plan))
    stages = []
    for s in range(len(partition)):
        lo, hi = stage_bounds(partition, s)
        stages.append(Stage(cfg, modules[lo:hi], plan, torch.device("cpu"),
                            saved_tracker=SavedTensorTracker()))
    images = x0 if cfg.method.name == "infopro" else None
    for step in range(steps):
        x = x0
        for r, st in enumerate(stages):
            x, upstream = st.train_step(step, 0.01, x, y0, images)
            if upstream:
                stages[r - 1].receive_grads(step, upstream)
    out = []
    numel = [math.prod(s) for s in output_shapes(modules, shape)]
    for r, st in enumerate(stages):
        mods = list(st.modules.values())
        static = state_bytes(mods, st.optimizers.values())
        item = x0.new_empty(0).element_size() * batch
        act_in = item * numel[st.first - 1] if r > 0 else 0
        grads_in = len(st.from_next) if r < len(stages) - 1 else 0
        # engine/p2p.py: a ring of 2 receive slots (lockstep) + one buffer for the window
        # gradients from the next rank, shaped like this stage's output
        comm = act_in * 2 + grads_in * item * numel[st.last]
        out.append({"rank": r, "modules": st.indices, "activation_bytes": st.tracker.peak,
                    "state_bytes": static, "comm_bytes": comm,
                    "total_bytes": st.tracker.peak + static + comm})
    return out


def stage_alone(cfg: Config, spec: DatasetSpec, modules, plan, partition: list[int], rank: int,
                batch: int, device: torch.device, steps: int = 10, warmup: int = 3) -> dict:
    """Rank `rank`'s stage alone on `device`, with real shapes: median seconds per training
    step (CUDA events on GPUs, a host timer on CPU) and its memory (the allocator's peak and
    NVML's used memory on CUDA; saved tensors + state on CPU). Only this stage's modules, its
    optimizer state, its receive ring (2 slots) and its gradient buffer live on the device, as
    on a pipeline's rank; inputs and the window gradients from the next rank are random
    tensors of the boundary's shape (time and memory depend on shapes, not values)."""
    lo, hi = stage_bounds(partition, rank)
    mods = modules[lo:hi]
    image_shape = (spec.in_channels, *spec.image_size)
    shapes = output_shapes(modules[:hi], image_shape)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    for m in mods:
        m.to(device)
    # on CUDA the warm-up steps are traced (their saved-for-backward bytes), the timed ones not
    tracker = SavedTensorTracker(steps=warmup if cuda else None)
    stage = Stage(cfg, mods, plan, device, saved_tracker=tracker)
    in_shape = image_shape if lo == 0 else shapes[lo - 1]
    ring = [torch.randn(batch, *in_shape, device=device) for _ in range(1 if lo == 0 else 2)]
    y = torch.randint(0, spec.num_classes, (batch,), device=device)
    images = (torch.randn(batch, *image_shape, device=device) if cfg.method.name == "infopro"
              else None)
    grads_in = len(stage.from_next) if hi < len(modules) else 0
    gbuf = (torch.randn(grads_in, batch, *shapes[hi - 1], device=device)
            .mul_(1e-3) if grads_in else None)
    times, pending = [], []
    for step in range(warmup + steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        stage.train_step(step, 0.01, ring[step % len(ring)], y, images)
        if grads_in:
            stage.receive_grads(step, list(gbuf.unbind(0)))
        if cuda:
            end.record()
            if step >= warmup:
                pending.append((start, end))
        elif step >= warmup:
            times.append(time.perf_counter() - t0)
    out = {"rank": rank, "modules": [lo, hi - 1], "activation_bytes": tracker.peak}
    if cuda:
        torch.cuda.synchronize(device)
        times = [a.elapsed_time(b) / 1e3 for a, b in pending]
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
        out.update({k: v for k, v in cuda_memory(device).items() if k == "nvml_used"})
    else:
        out["peak_bytes"] = tracker.peak + state_bytes(mods, stage.optimizers.values())
    out["step_s"] = sorted(times)[len(times) // 2]
    del stage, ring, gbuf, images
    for m in mods:
        m.to("cpu")
    if cuda:
        torch.cuda.empty_cache()
    return out


def _numel_out(modules, k: int, spec: DatasetSpec) -> int:
    return math.prod(output_shapes(modules[:k + 1], (spec.in_channels, *spec.image_size))[k])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipemlaan.profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config")
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--batch", type=int, default=0, help="batch size (default: train.batch_size)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args, overrides = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, overrides)
        batch = args.batch or cfg.train.batch_size
        per_rank = profile_memory(cfg, dataset_spec(cfg.data), args.ranks, batch,
                                  partition=cfg.pipeline.partition or None)
        t = Table(title=f"{method_label(cfg.method)} {cfg.model.name} K={cfg.model.K}, "
                        f"batch {batch}, {args.ranks} rank(s) (MiB)")
        for col in ("rank", "modules", "saved for backward", "params+grads+optim",
                    "P2P buffers", "total"):
            t.add_column(col, justify="right")
        for r in per_rank:
            t.add_row(str(r["rank"]), f"{r['modules'][0]}-{r['modules'][-1]}",
                      *(f"{r[k] / 2**20:.1f}" for k in ("activation_bytes", "state_bytes",
                                                        "comm_bytes", "total_bytes")))
        console.print(t)
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"ranks": args.ranks, "batch": batch, "per_rank": per_rank}, indent=1))
    except PipemlaanError as e:
        print(f"pipemlaan: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
