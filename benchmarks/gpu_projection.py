"""Images/s on 2, 4 and 8 GPUs, projected from per-stage times measured on one GPU.

What is measured (on the device this runs on, CUDA events, real shapes, batch 1024 by default):
- the single process of each method (BP, DGL+MLAAN), a whole training step;
- each rank's stage alone of an S-stage DGL+MLAAN pipeline, S = 2, 4, 8 (pipemlaan.profile's
  `stage_alone`: forward, heads, local backward, window backward, optimizer steps);
- BP's S stages at the micro-batch size torch.distributed.pipelining's 1F1B would use: forward
  + backward of each stage's blocks alone;
- the boundary activation's bytes, and a device -> pinned host -> device round trip of it (the
  path ranks that share a GPU take; one GPU cannot measure NVLink between two).

What is projected (stated, not measured): one GPU per stage, links of `--link-gbps` GB/s
(NVLink 4 on H100: 450 GB/s per direction nominal; 100 is the default, a conservative
effective figure), communication overlapped with compute (NCCL on its own stream), so
  pipemlaan (async, no bubble):  images/s = batch / max_s max(t_s, bytes_s / link)
  stages x replicas:             + a ring all-reduce of the stage's gradients per step
  BP 1F1B (m micro-batches):     images/s = batch / ((m + S - 1) * max_s (f_s + b_s))
and efficiency = projected images/s / (N x the same method's single-process images/s).

  python -m benchmarks.gpu_projection --json benchmarks/results/gpu-projection.json
  python -m benchmarks.gpu_projection --device cpu --model resnet8 --K 4 --batch 32 \
      --image 3,16,16 --stages 2 --steps 2     # the same code on CPU (what the test runs)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from pipemlaan.config import load_config
from pipemlaan.data import DatasetSpec
from pipemlaan.engine.partition import balanced_partition, stage_bounds, window_spans
from pipemlaan.local.module import build_local_modules, output_shapes, window_plan
from pipemlaan.models import build_backbone
from pipemlaan.profile import stage_alone
from pipemlaan.ui import console

METHOD_FLAGS = {"dgl+mlaan": ["--method.name=dgl", "--method.mlm=true", "--method.lam=true"],
                "dgl": ["--method.name=dgl", "--method.mlm=false", "--method.lam=false"],
                "bp": ["--method.name=bp", "--method.mlm=false", "--method.lam=false"]}


class _Clock:
    """Median seconds of a callable: CUDA events on GPUs, the host timer on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def median(self, fn, steps: int, warmup: int) -> float:
        times = []
        for i in range(warmup + steps):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                t = a.elapsed_time(b) / 1e3
            else:
                t0 = time.perf_counter()
                fn()
                t = time.perf_counter() - t0
            if i >= warmup:
                times.append(t)
        return statistics.median(times)


def bp_stage_times(model: str, spec: DatasetSpec, stages: int, micro: int,
                   device: torch.device, steps: int, warmup: int) -> list[float]:
    """Forward + backward seconds of each of BP's S stages (blocks split evenly by parameter
    count), one micro-batch, each stage alone on the device."""
    torch.manual_seed(0)
    bb = build_backbone(model, spec.in_channels, spec.num_classes)
    items = [*bb.blocks, bb.classifier]
    costs = [sum(p.numel() for p in it.parameters()) + 1.0 for it in items]
    counts = balanced_partition(costs, stages)
    clock, out = _Clock(device), []
    x = torch.randn(micro, spec.in_channels, *spec.image_size, device=device)
    for s in range(stages):
        lo, hi = stage_bounds(counts, s)
        part = nn.Sequential(*items[lo:hi]).to(device)
        inp = x.detach().requires_grad_(True)

        def step():
            y = part(inp)
            y.backward(torch.ones_like(y))
        out.append(clock.median(step, steps, warmup))
        with torch.no_grad():
            x = part(inp)               # the next stage's input
        part.to("cpu")
    return out


def single_step_time(method: str, args, spec, device) -> float:
    cfg = load_config(None, [*METHOD_FLAGS[method], f"--model.name={args.model}",
                             f"--model.K={args.K}", *args.overrides])
    _, mods = build_local_modules(cfg, spec)
    plan = window_plan(cfg, len(mods))
    return stage_alone(cfg, spec, mods, plan, [len(mods)], 0, args.batch, device,
                       steps=args.steps, warmup=args.warmup)["step_s"]


def staged_round_trip(nbytes: int, device: torch.device, clock: _Clock) -> float:
    """Seconds to move `nbytes` device -> pinned host -> device (the shared-GPU path)."""
    if device.type != "cuda":
        return 0.0
    src = torch.empty(nbytes // 4, device=device)
    host = torch.empty(nbytes // 4, pin_memory=True)
    dst = torch.empty_like(src)

    def trip():
        host.copy_(src, non_blocking=True)
        dst.copy_(host, non_blocking=True)
    return clock.median(trip, 5, 2)


def project(args) -> dict:
    device = torch.device(args.device)
    c, h, w = args.image
    spec = DatasetSpec("synthetic", c, (h, w), 10, (0.0,) * c, (1.0,) * c)
    clock = _Clock(device)
    single = {m: single_step_time(m, args, spec, device) for m in ("bp", "dgl+mlaan")}
    console.print("single process: " + ", ".join(f"{m} {args.batch / t:,.0f} img/s"
                                                  for m, t in single.items()))
    cfg = load_config(None, [*METHOD_FLAGS["dgl+mlaan"], f"--model.name={args.model}",
                             f"--model.K={args.K}", *args.overrides])
    _, mods = build_local_modules(cfg, spec)
    plan = window_plan(cfg, len(mods))
    item = 2 if args.bf16 else 4
    shapes = output_shapes(mods, (c, h, w))
    rows = []
    for S in args.stages:
        parts = balanced_partition([1.0] * len(mods), S, window_spans(plan))
        per = [stage_alone(cfg, spec, mods, plan, parts, r, args.batch, device,
                           steps=args.steps, warmup=args.warmup) for r in range(S)]
        bounds = [args.batch * item * math.prod(shapes[stage_bounds(parts, r)[1] - 1])
                  for r in range(S - 1)]
        link = args.link_gbps * 1e9
        # a boundary carries the activation forward and (MLM) one window gradient back
        comm = [2 * max(bounds[r - 1] if r > 0 else 0, bounds[r] if r < S - 1 else 0) / link
                for r in range(S)]
        t_stage = [max(p["step_s"], cm) for p, cm in zip(per, comm)]
        ips = args.batch / max(t_stage)
        micro = max(1, args.batch // args.microbatches)
        bp = bp_stage_times(args.model, spec, S, micro, device, args.steps, args.warmup)
        bp_ips = args.batch / ((args.microbatches + S - 1) * max(bp))
        grads = [sum(p.numel() for m in mods[stage_bounds(parts, r)[0]:stage_bounds(parts, r)[1]]
                     for p in m.parameters()) * 4 for r in range(S)]
        row = {"gpus": S, "stages": S, "replicas": 1, "partition": parts,
               "stage_step_s": [p["step_s"] for p in per],
               "stage_peak_bytes": [p["peak_bytes"] for p in per],
               "boundary_bytes": bounds,
               "staged_round_trip_s": [staged_round_trip(b, device, clock) for b in bounds],
               "pipemlaan_images_per_s": ips,
               "pipemlaan_efficiency": ips / (S * args.batch / single["dgl+mlaan"]),
               "bp_1f1b_stage_fwd_bwd_s": bp, "bp_1f1b_microbatches": args.microbatches,
               "bp_1f1b_images_per_s": bp_ips,
               "bp_1f1b_efficiency": bp_ips / (S * args.batch / single["bp"])}
        rows.append(row)
        # stages x replicas on 8 GPUs: S stages x (8 / S) replicas, ring all-reduce per step
        D = 8 // S
        if D > 1:
            ar = max(2 * (D - 1) / D * g / link for g in grads)
            rep = D * args.batch / (max(t_stage) + ar)
            rows.append({"gpus": 8, "stages": S, "replicas": D, "partition": parts,
                         "allreduce_s": ar, "pipemlaan_images_per_s": rep,
                         "pipemlaan_efficiency": rep / (8 * args.batch / single["dgl+mlaan"])})
        console.print(f"S={S}: pipemlaan {ips:,.0f} img/s projected, BP 1F1B {bp_ips:,.0f}")
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "args": {k: v for k, v in vars(args).items()},
            "measured": {"single_process_step_s": single,
                         "single_process_images_per_s": {m: args.batch / t
                                                         for m, t in single.items()}},
            "projected": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_projection", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="resnet110")
    p.add_argument("--K", type=int, default=55)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--image", default="3,32,32")
    p.add_argument("--stages", default="2,4,8")
    p.add_argument("--microbatches", type=int, default=8, help="BP 1F1B micro-batches")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--link-gbps", type=float, default=100.0)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast + channels-last")
    p.add_argument("--json")
    args, extra = p.parse_known_args(argv)
    args.image = tuple(int(v) for v in args.image.split(","))
    args.stages = [int(v) for v in args.stages.split(",")]
    args.overrides = ["--train.bf16=true", "--train.channels_last=true"] if args.bf16 else []
    args.overrides += extra
    if args.device == "cuda" and not torch.cuda.is_available():
        print("pipemlaan: error: no CUDA device is visible; pass --device cpu", file=sys.stderr)
        return 2
    result = project(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
