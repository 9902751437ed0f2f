"""Memory per device, for any config: `python -m pipemlaan.profile --config X.toml --ranks 4`.

Runs a few training steps of the real stage code for every rank of an R-rank pipeline inside one
process (the stages hand activations and window gradients to each other exactly as a lockstep
pipeline does over P2P) and reports, per rank, the device-independent accounting that
metrics.py documents (README, "Memory per device"): peak bytes saved for backward +
parameters, gradients, buffers and optimizer state + the P2P receive buffers. `--table3` prints
the paper's Table 3 shape (BP and the local methods on ResNet-32 / ResNet-110 at CIFAR shapes
and ResNet-34 at ImageNet shapes), with the paper's figures beside them.

`--device cuda` measures on the GPU instead: each rank's stage alone on the device with real
shapes (`stage_alone`), reporting CUDA's allocator peak (NVML's used memory in the JSON) and the
stage's median step time from CUDA events, which benchmarks/gpu_projection.py turns into
projected images/s on N GPUs.

Examples:
  python -m pipemlaan.profile --config configs/fmnist_mlaan_cpu.toml --ranks 2
  python -m pipemlaan.profile --table3 --ranks 4 --batch 128 --imagenet-batch 16
  python -m pipemlaan.profile --table3 --ranks 4 --batch 1024 --imagenet-batch 128 \
      --device cuda --json benchmarks/results/memory-cuda.json
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
from pipemlaan.data import DatasetSpec
from pipemlaan.engine.partition import balanced_partition, measure_costs, stage_bounds, window_spans
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
            small = min(batch, 8)
            costs = measure_costs(modules, x0[:small], y0[:small], repeats=1)
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
            x, upstream = st.forward_batch(step, 0.01, x, y0, images)
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
    tracker = None if cuda else SavedTensorTracker()
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
        stage.forward_batch(step, 0.01, ring[step % len(ring)], y, images)
        if grads_in:
            stage.receive_grads(step, list(gbuf.unbind(0)))
        if cuda:
            end.record()
            if step >= warmup:
                pending.append((start, end))
        elif step >= warmup:
            times.append(time.perf_counter() - t0)
    out = {"rank": rank, "modules": [lo, hi - 1]}
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


def _spec(kind: str, name: str = "synthetic") -> DatasetSpec:
    c, h, w, n = SHAPES[kind]
    return DatasetSpec(name, c, (h, w), n, (0.0,) * c, (1.0,) * c)


TABLE3 = [("ResNet-32 (K=16)", "resnet32", 16, "cifar"),
          ("ResNet-110 (K=55)", "resnet110", 55, "cifar"),
          ("ResNet-34 (K=17)", "resnet34", 17, "imagenet")]
METHODS = [("bp", "bp", False, False), ("dgl", "dgl", False, False),
           ("dgl+mlaan", "dgl", True, True), ("infopro", "infopro", False, False),
           ("infopro+mlaan", "infopro", True, True)]


# The paper's Table 3 (GB, one GPU): BP and MLAAN (DGL+MLAAN) per network.
PAPER_TABLE3 = {("ResNet-32 (K=16)", "bp"): 3.37, ("ResNet-32 (K=16)", "dgl+mlaan"): 2.62,
                ("ResNet-110 (K=55)", "bp"): 9.26, ("ResNet-110 (K=55)", "dgl+mlaan"): 2.76,
                ("ResNet-34 (K=17)", "bp"): 10.74, ("ResNet-34 (K=17)", "dgl+mlaan"): 9.09}


def table3(ranks: int, batch: int, imagenet_batch: int, methods=METHODS, nets=TABLE3,
           device: torch.device = torch.device("cpu"), cfg_overrides=(),
           alone: bool | None = None, steps: int = 6) -> list[dict]:
    """Memory of one process and of each rank of an R-rank pipeline. On CPU the accounting of
    `profile_memory`; on CUDA (or with alone=True) each rank's stage alone on the device
    (`stage_alone`: the allocator's peak on CUDA, and its median step time)."""
    alone = device.type == "cuda" if alone is None else alone
    rows = []
    for label, model, K, kind in nets:
        for mlabel, name, mlm, lam in methods:
            cfg = load_config(None, list(cfg_overrides))
            cfg.model.name, cfg.model.K = model, K
            cfg.method.name, cfg.method.mlm, cfg.method.lam = name, mlm, lam
            b = imagenet_batch if kind == "imagenet" else batch
            spec = _spec(kind)
            row = {"network": label, "method": mlabel, "batch": b,
                   "paper_gb": PAPER_TABLE3.get((label, mlabel))}
            if alone:
                torch.manual_seed(0)
                _, modules = build_local_modules(cfg, spec)
                plan = window_plan(cfg, len(modules))
                one = stage_alone(cfg, spec, modules, plan, [len(modules)], 0, b, device,
                                  steps=steps, warmup=2)
                row.update(single_process_bytes=one["peak_bytes"], single_step_s=one["step_s"])
                if name != "bp" and ranks > 1:
                    parts = balanced_partition([1.0] * len(modules), ranks,
                                               window_spans(plan))
                    per = [stage_alone(cfg, spec, modules, plan, parts, r, b, device,
                                       steps=steps, warmup=2) for r in range(ranks)]
                    row.update(partition=parts, per_rank_bytes=[p["peak_bytes"] for p in per],
                               per_rank_step_s=[p["step_s"] for p in per])
                else:
                    row["per_rank_bytes"] = None
            else:
                row["single_process_bytes"] = profile_memory(cfg, spec, 1, b)[0]["total_bytes"]
                per_rank = (profile_memory(cfg, spec, ranks, b) if name != "bp" and ranks > 1
                            else None)
                row["per_rank_bytes"] = [r["total_bytes"] for r in per_rank] if per_rank \
                    else None
            rows.append(row)
            console.print(f"  measured {label} {mlabel}", style="dim")
    return rows


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def render_table3(rows: list[dict], ranks: int) -> Table:
    t = Table(title=f"Memory per device (GiB; saved-for-backward + params/grads/optimizer "
                    f"+ P2P buffers), {ranks}-rank pipelines")
    t.add_column("network")
    t.add_column("method")
    t.add_column("1 process", justify="right")
    for r in range(ranks):
        t.add_column(f"rank {r}", justify="right")
    t.add_column("max rank / BP", justify="right")
    t.add_column("paper (GB)", justify="right")
    bp = {}
    for row in rows:
        if row["method"] == "bp":
            bp[row["network"]] = row["single_process_bytes"]
        per = row["per_rank_bytes"] or []
        ratio = (max(per) / bp[row["network"]]) if per and row["network"] in bp else None
        t.add_row(row["network"], row["method"], _gib(row["single_process_bytes"]),
                  *[_gib(b) for b in per] + ["-"] * (ranks - len(per)),
                  f"{ratio:.0%}" if ratio else "-",
                  f"{row['paper_gb']:.2f}" if row.get("paper_gb") else "-")
    return t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipemlaan.profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config")
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--batch", type=int, default=0, help="batch size (default: train.batch_size)")
    p.add_argument("--table3", action="store_true")
    p.add_argument("--imagenet-batch", type=int, default=16)
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--nets", default="", help="--table3 rows: models to keep, e.g. "
                   "resnet34,resnet110 (default: all three)")
    p.add_argument("--methods", default="", help="--table3 methods to keep, e.g. bp,dgl+mlaan "
                   "(default: all five)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: each rank's stage alone on the GPU (allocator peak, NVML, step "
                        "time) instead of the CPU accounting")
    args, overrides = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.table3:
            if args.device == "cuda" and not torch.cuda.is_available():
                raise PipemlaanError("--device cuda but no CUDA device is visible")
            nets = [n for n in TABLE3 if not args.nets or n[1] in args.nets.split(",")]
            methods = [m for m in METHODS
                       if not args.methods or m[0] in args.methods.split(",")]
            if not nets or not methods:
                raise PipemlaanError("--nets / --methods keep no row of Table 3: choose from "
                                     f"{[n[1] for n in TABLE3]} and {[m[0] for m in METHODS]}")
            rows = table3(args.ranks, args.batch or 128, args.imagenet_batch, methods=methods,
                          nets=nets, device=torch.device(args.device), cfg_overrides=overrides)
            console.print(render_table3(rows, args.ranks))
            result = {"ranks": args.ranks, "rows": rows}
        else:
            cfg = load_config(args.config, overrides)
            from pipemlaan.data import dataset_spec
            spec = dataset_spec(cfg.data)
            batch = args.batch or cfg.train.batch_size
            per_rank = profile_memory(cfg, spec, args.ranks, batch,
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
            result = {"ranks": args.ranks, "batch": batch, "per_rank": per_rank}
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    except PipemlaanError as e:
        print(f"pipemlaan: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
