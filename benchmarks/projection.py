"""Throughput projections, one tool: the cost model checked against CPU measurements, projected
to 2-64 GPUs from FLOP counts, and projected to 2, 4 and 8 GPUs from stage times measured on one
GPU; plus what the pipeline costs when its ranks share one GPU. Every figure that was not
measured is labelled "projected".

The model (S pipeline stages, D data-parallel replicas of the whole pipeline):
  t_stage(r) = compute(r) + comm(r) - overlap * min(comm(r), compute(r)) + allreduce(r)
  compute(r) = the stage's measured (or FLOP-counted) seconds per step
  comm(r)    = bytes rank r receives and sends per step (activation forward, window gradients
               back) / link bandwidth; overlap 1 (NCCL on its own stream) hides it behind
               compute up to compute's length, overlap 0 (gloo on a shared CPU) hides nothing
  allreduce  = 2 (D-1)/D * the stage's gradient bytes / bandwidth (D > 1; not overlapped: the
               trainer runs it before each optimizer step)
  images/s   = D * batch / max_r t_stage(r)
A local-learning pipeline has no backward locking across the network and no steady-state
bubble: the slowest stage sets the pace. Beside it, the same global batch on N GPUs with BP:
  torch.distributed.pipelining 1F1B, m micro-batches: batch / ((m + S - 1) * max_s (f_s + b_s))
  DDP, N replicas of batch/N: batch / max(t_step(batch/N), ring all-reduce of the gradients)
  (DDP overlaps its bucketed all-reduce with the backward pass).

Subcommands:
  python -m benchmarks.projection measure --json benchmarks/results/projection-cuda.json \\
      [--shared benchmarks/results/throughput-cuda-shared-<stamp>.json]
      on one GPU (CUDA events, real shapes): the single process of BP and DGL+MLAAN, each rank's
      stage alone of an S-stage DGL+MLAAN pipeline (S = 2, 4, 8), BP's S stages at the 1F1B
      micro-batch, BP at batch/N for DDP, the boundary bytes, and a pinned host round trip of
      them; projects 2, 4 and 8 GPUs (one per rank, NCCL). --shared adds what a pipeline whose
      ranks shared this GPU measured (benchmarks/throughput.py --ranks 1,4): images/s beside
      the single process, and per rank compute, waits and host staging.
  python -m benchmarks.projection measure --device cpu --model resnet8 --K 4 --batch 32 \\
      --image 3,16,16 --stages 2 --steps 2        (the same code on CPU: what the test runs)
  python -m benchmarks.projection validate benchmarks/results/throughput-cpu-<stamp>.json
      per-module costs measured on this CPU (one thread), predicted single-process and pipeline
      images/s against the measured ones;
  python -m benchmarks.projection flops [--json F]
      1..64 GPUs (stages x replicas) and every layout of 8 nodes x 8 GPUs, ResNet-110 K=55 and
      ResNet-32 K=16 at CIFAR shapes, from FLOP counts and stated assumptions (ASSUMPTIONS).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipemlaan.config import Config, load_config, parse_method
from pipemlaan.data import DatasetSpec
from pipemlaan.errors import ConfigError
from pipemlaan.flops import module_training_flops
from pipemlaan.engine.partition import (balanced_partition, measure_costs, stage_bounds,
                                        window_spans)
from pipemlaan.local.module import build_local_modules, output_shapes, window_plan
from pipemlaan.models import build_backbone
from pipemlaan.profile import stage_alone
from pipemlaan.ui import console


def say(text: str) -> None:
    """One line of output, never wrapped, no highlighting of numbers."""
    console.print(text, soft_wrap=True, highlight=False)


# ---- the model ------------------------------------------------------------------------------
def stage_time(compute: float, comm: float, overlap: float = 1.0, allreduce: float = 0.0
               ) -> float:
    """Seconds per step of one stage (the module docstring's t_stage)."""
    return compute + comm - overlap * min(comm, compute) + allreduce


def ring_allreduce_s(nbytes: float, replicas: int, bandwidth: float) -> float:
    return 2 * (replicas - 1) / replicas * nbytes / bandwidth if replicas > 1 else 0.0


@dataclass
class Setup:
    costs: list[float]            # seconds per step, per module
    boundary_bytes: list[int]     # bytes of module k's output activation (per step)
    grad_bytes: list[int]         # gradient bytes of module k (parameters incl. heads)
    batch: int


def predict(setup: Setup, partition: list[int], bandwidth: float, overlap: float = 1.0,
            replicas: int = 1, dp_bandwidth: float | None = None,
            grads_back: int = 1) -> dict:
    """Projected images/s and per-stage times of one partition (module counts per rank)."""
    times, lo = [], 0
    for r, n in enumerate(partition):
        hi = lo + n
        moved = 0
        if r > 0:                      # activation in, window gradient(s) out
            moved += setup.boundary_bytes[lo - 1] * (1 + grads_back)
        if r < len(partition) - 1:     # activation out, window gradient(s) in
            moved += setup.boundary_bytes[hi - 1] * (1 + grads_back)
        ar = ring_allreduce_s(sum(setup.grad_bytes[lo:hi]), replicas, dp_bandwidth or bandwidth)
        times.append(stage_time(sum(setup.costs[lo:hi]), moved / bandwidth, overlap, ar))
        lo = hi
    slowest = max(times)
    return {"images_per_s": replicas * setup.batch / slowest, "stage_s": times,
            "balance": sum(times) / len(times) / slowest}


def bp_1f1b_images_per_s(batch: int, microbatches: int, stage_fwd_bwd_s: list[float]) -> float:
    """BP pipelined by torch.distributed.pipelining's 1F1B: the bubble of S - 1 slots."""
    S = len(stage_fwd_bwd_s)
    return batch / ((microbatches + S - 1) * max(stage_fwd_bwd_s))


def bp_ddp_images_per_s(batch: int, step_s_local: float, grad_bytes: int, gpus: int,
                        bandwidth: float) -> float:
    """BP data-parallel on `gpus` GPUs, each a batch/gpus slice, all-reduce overlapped."""
    return batch / max(step_s_local, ring_allreduce_s(grad_bytes, gpus, bandwidth))


def _cfg(model: str, K: int, method: str, overrides=()) -> Config:
    """A default config for `method` written as dgl, dgl+mlaan, infopro+mlaan, ..."""
    cfg = load_config(None, list(overrides)) if overrides else Config()
    cfg.model.name, cfg.model.K = model, K
    cfg.method.name, cfg.method.mlm, cfg.method.lam = parse_method(method)
    return cfg


def _spec(image, classes: int = 10) -> DatasetSpec:
    c, h, w = image
    return DatasetSpec("synthetic", c, (h, w), classes, (0.0,) * c, (1.0,) * c)


# ---- validate: the model against CPU measurements -------------------------------------------
def measure_setup(model: str, K: int, method: str, batch: int, image: tuple[int, int, int],
                  classes: int = 10, repeats: int = 3) -> Setup:
    c, h, w = image
    _, modules = build_local_modules(_cfg(model, K, method), _spec(image, classes))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c, h, w, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    costs = measure_costs(modules, x, y, repeats=repeats)
    bytes_out, grads = [], []
    with torch.no_grad():
        z = x
        for m in modules:
            z = m.body(z)
            bytes_out.append(z.numel() * 4)
            grads.append(sum(p.numel() * 4 for p in m.parameters() if p.requires_grad))
    return Setup(costs, bytes_out, grads, batch)


def validate(results_path: Path) -> dict:
    res = json.loads(results_path.read_text())
    a = res["args"]
    out = {}
    for method in a["methods"]:
        if method == "bp":
            continue
        setup = measure_setup(a["model"], a["K"], method, a["batch"], tuple(a["image"]))
        single = predict(setup, [len(setup.costs)], bandwidth=float("inf"))
        out[f"{method} single"] = single["images_per_s"]
        for n in a["ranks"]:
            if n < 2:
                continue
            label = f"{method} {n} ranks"
            part = res["results"][label].get("partition") or balanced_partition(setup.costs, n)
            # gloo over loopback on a shared CPU: transfers cost CPU time, none overlapped
            out[label] = predict(setup, part, bandwidth=2e9, overlap=0.0)["images_per_s"]
    rows = []
    for label, pred in out.items():
        meas = res["results"][label]["median"]
        rows.append({"configuration": label, "predicted": pred, "measured": meas,
                     "error": pred / meas - 1})
    return {"results_file": str(results_path), "rows": rows}


# ---- flops: projections from counted multiply-adds ------------------------------------------
ASSUMPTIONS = {
    "gpu_flops_per_s": 60e12,   # effective bf16 FLOP/s of an H100 on small-channel CIFAR convs
    "nvlink_bytes_per_s": 150e9,
    "infiniband_bytes_per_s": 25e9,
    "gpus_per_node": 8,
}
LAYOUTS = [(1, 1), (4, 4), (8, 8), (8, 4), (64, 8), (64, 16)]     # (GPUs, stages)
EIGHT_NODES = [(64, s) for s in (4, 8, 16, 32)]                    # 8 nodes x 8 GPUs


def flop_setup(model: str, K: int, method: str, batch: int, image, flops_per_s: float,
               classes: int = 10) -> Setup:
    """Per-module costs from counted training FLOPs (pipemlaan/flops.py: 6 x multiply-adds of
    every trained layer, 2 x those of the EMA twins, which run forward only)."""
    c, h, w = image
    _, modules = build_local_modules(_cfg(model, K, method), _spec(image, classes))
    costs, bytes_out, grads = [], [], []
    z, images = torch.zeros(1, c, h, w), torch.zeros(1, c, h, w)
    for mod in modules:
        flops, out = module_training_flops(mod, z, images)
        costs.append(flops * batch / flops_per_s)
        bytes_out.append(out.numel() * batch * 2)     # bf16 activations on GPUs
        grads.append(sum(p.numel() * 4 for p in mod.parameters() if p.requires_grad))
        z = out
    return Setup(costs, bytes_out, grads, batch)


def project_flops(model: str, K: int, method: str, batch_per_replica: int,
                  layouts: list[tuple[int, int]] = LAYOUTS) -> list[dict]:
    a = ASSUMPTIONS
    setup = flop_setup(model, K, method, batch_per_replica, (3, 32, 32), a["gpu_flops_per_s"])
    spans = window_spans(window_plan(_cfg(model, K, method), K))
    base = predict(setup, [K], bandwidth=float("inf"))["images_per_s"]
    rows = []
    for gpus, stages in layouts:
        if stages > K:
            continue
        replicas = gpus // stages
        try:
            part = balanced_partition(setup.costs, stages, spans)
        except ConfigError:      # a window would span more than one boundary
            continue
        # stages inside a node talk over NVLink; replicas of one stage sit on different nodes
        # once there are more than one node's worth of GPUs
        dp_bw = a["nvlink_bytes_per_s"] if gpus <= a["gpus_per_node"] else \
            a["infiniband_bytes_per_s"]
        p = predict(setup, part, bandwidth=a["nvlink_bytes_per_s"], overlap=1.0,
                    replicas=replicas, dp_bandwidth=dp_bw)
        rows.append({"gpus": gpus, "stages": stages, "replicas": replicas, "projected": True,
                     "images_per_s": p["images_per_s"], "speedup": p["images_per_s"] / base,
                     "efficiency": p["images_per_s"] / base / gpus, "balance": p["balance"]})
    return rows


# ---- measure: stage times on one device, projected to 2, 4 and 8 GPUs -----------------------
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


def bp_stage_times(cfg: Config, spec: DatasetSpec, stages: int, micro: int,
                   device: torch.device, steps: int, warmup: int) -> list[float]:
    """Forward + backward seconds of each of BP's S stages (blocks split evenly by parameter
    count), one micro-batch, each stage alone on the device, in the run's precision and
    memory format (what torch.distributed.pipelining's stages would run)."""
    torch.manual_seed(0)
    bb = build_backbone(cfg.model.name, spec.in_channels, spec.num_classes,
                        image_size=spec.image_size)
    items = [*bb.blocks, bb.classifier]
    costs = [sum(p.numel() for p in it.parameters()) + 1.0 for it in items]
    counts = balanced_partition(costs, stages)
    cuda = device.type == "cuda"
    nhwc = cuda and cfg.train.channels_last
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and cfg.train.bf16)
    clock, out = _Clock(device), []
    x = torch.randn(micro, spec.in_channels, *spec.image_size, device=device)
    for s in range(stages):
        lo, hi = stage_bounds(counts, s)
        part = nn.Sequential(*items[lo:hi]).to(device)
        if nhwc:
            part.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
        inp = x.detach().requires_grad_(True)

        def step():
            with autocast:
                y = part(inp)
            y.backward(torch.ones_like(y))
        out.append(clock.median(step, steps, warmup))
        with torch.no_grad(), autocast:
            x = part(inp).float()        # the next stage's input
        part.to("cpu")
    return out


def staged_round_trip(nbytes: int, device: torch.device, clock: _Clock) -> float:
    """Seconds to move `nbytes` device -> pinned host -> device (the shared-GPU path; 0 on
    CPU, where gloo reads the tensors in place)."""
    if device.type != "cuda" or nbytes <= 0:
        return 0.0
    src = torch.empty(max(1, nbytes // 4), device=device)
    host = torch.empty(src.numel(), pin_memory=True)
    dst = torch.empty_like(src)

    def trip():
        host.copy_(src, non_blocking=True)
        dst.copy_(host, non_blocking=True)
    return clock.median(trip, 5, 2)


def _boundaries(mods, plan, parts: list[int], image, batch: int, item: int) -> list[dict]:
    """Per boundary r|r+1: activation bytes and the window gradients crossing back."""
    shapes = output_shapes(mods, tuple(image))
    out = []
    for r in range(len(parts) - 1):
        last = stage_bounds(parts, r)[1] - 1
        act = batch * item * math.prod(shapes[last])
        windows = len([j for j in plan.covering(last) if j > last])
        out.append({"activation_bytes": act, "window_grads": windows,
                    "bytes": act * (1 + windows)})
    return out


def measure(args) -> dict:
    device = torch.device(args.device)
    spec = _spec(args.image)
    clock = _Clock(device)
    over = [f"--train.bf16={str(args.precision == 'bf16').lower()}", *args.overrides]
    cfgs = {m: _cfg(args.model, args.K, m, over) for m in ("bp", "dgl+mlaan")}
    single = {}
    for m, cfg in cfgs.items():
        _, mods = build_local_modules(cfg, spec)
        single[m] = stage_alone(cfg, spec, mods, window_plan(cfg, len(mods)), [len(mods)], 0,
                                args.batch, device, steps=args.steps,
                                warmup=args.warmup)["step_s"]
    say("measured, single process (eager): " + ", ".join(
        f"{m} {args.batch / t:,.0f} img/s" for m, t in single.items()))
    cfg = cfgs["dgl+mlaan"]
    _, mods = build_local_modules(cfg, spec)
    plan = window_plan(cfg, len(mods))
    bp_mods = build_local_modules(cfgs["bp"], spec)[1]
    bp_grad_bytes = sum(p.numel() * 4 for m in bp_mods for p in m.parameters())
    item = 2 if args.precision == "bf16" and device.type == "cuda" else 4
    link = args.link_gbps * 1e9
    micro = max(1, args.batch // args.microbatches)
    measured = {"single_process_step_s": single,
                "single_process_images_per_s": {m: args.batch / t for m, t in single.items()},
                "stages": {}, "bp_ddp_step_s": {}}
    rows = []
    for S in args.stages:
        if S > len(mods):
            continue
        parts = balanced_partition([1.0] * len(mods), S, window_spans(plan))
        per = [stage_alone(cfg, spec, mods, plan, parts, r, args.batch, device,
                           steps=args.steps, warmup=args.warmup) for r in range(S)]
        bounds = _boundaries(mods, plan, parts, args.image, args.batch, item)
        bp = bp_stage_times(cfgs["bp"], spec, S, micro, device, args.steps, args.warmup)
        bp_local = stage_alone(cfgs["bp"], spec, bp_mods, window_plan(cfgs["bp"], 1), [1], 0,
                               max(1, args.batch // S), device, steps=args.steps,
                               warmup=args.warmup)["step_s"]
        grads = [sum(p.numel() * 4 for m in mods[slice(*stage_bounds(parts, r))]
                     for p in m.parameters() if p.requires_grad) for r in range(S)]
        measured["stages"][str(S)] = {
            "partition": parts, "stage_step_s": [p["step_s"] for p in per],
            "stage_peak_bytes": [p["peak_bytes"] for p in per], "boundaries": bounds,
            "staged_round_trip_s": [staged_round_trip(b["bytes"], device, clock)
                                    for b in bounds],
            "bp_1f1b_stage_fwd_bwd_s": bp, "bp_1f1b_microbatch": micro}
        measured["bp_ddp_step_s"][str(S)] = bp_local
        # a stage's link carries its boundaries' activations forward and gradients back
        comm = [(sum(b["bytes"] for b in bounds[max(r - 1, 0):r + 1])) / link for r in range(S)]
        t = [stage_time(p["step_s"], c, overlap=1.0) for p, c in zip(per, comm)]
        one = {m: args.batch / s for m, s in single.items()}
        rows.append(_row(S, f"pipemlaan DGL+MLAAN, {S} stages", args.batch / max(t),
                         one["dgl+mlaan"], stages=S, replicas=1, stage_s=t))
        rows.append(_row(S, f"BP, torch.distributed.pipelining 1F1B, {S} stages, "
                            f"{args.microbatches} micro-batches",
                         bp_1f1b_images_per_s(args.batch, args.microbatches, bp), one["bp"],
                         stages=S, replicas=1))
        rows.append(_row(S, f"BP, DDP, {S} replicas of batch {max(1, args.batch // S)}",
                         bp_ddp_images_per_s(args.batch, bp_local, bp_grad_bytes, S, link),
                         one["bp"], stages=1, replicas=S))
        D = 8 // S
        if D > 1:
            # 8 GPUs as S stages x D replicas: each replica a full batch, gradients all-reduced
            ar = [ring_allreduce_s(g, D, link) for g in grads]
            tr = [stage_time(p["step_s"], c, 1.0, a) for p, c, a in zip(per, comm, ar)]
            rows.append(_row(8, f"pipemlaan DGL+MLAAN, {S} stages x {D} replicas",
                             D * args.batch / max(tr), one["dgl+mlaan"], stages=S, replicas=D,
                             stage_s=tr))
        say(f"S={S}: pipemlaan {args.batch / max(t):,.0f} img/s projected, BP "
            f"1F1B {bp_1f1b_images_per_s(args.batch, args.microbatches, bp):,.0f}")
    rows.sort(key=lambda r: (r["gpus"], r["configuration"]))
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "args": {k: v for k, v in vars(args).items() if k != "func"},
           "assumptions": {"link_bytes_per_s": link, "overlap": "communication hidden "
                           "behind compute (NCCL on its own stream); DDP all-reduce hidden "
                           "behind the backward; one GPU per stage or replica"},
           "measured": measured, "projected": rows}
    if args.shared:
        out["shared_gpu"] = shared_report(Path(args.shared), device, clock)
        # the single process that pipeline ranks compete with runs as a CUDA graph, faster
        # than the eager stage times above: the projection against that, where measured
        graph = next((r["single_process_images_per_s"] for r in out["shared_gpu"]["rows"]
                      if r["single_process_images_per_s"]), None)
        for r in rows:
            if graph and r["configuration"].startswith("pipemlaan"):
                r["vs_single_process_measured"] = r["images_per_s"] / graph
    return out


def _row(gpus: int, what: str, ips: float, one_gpu: float, **extra) -> dict:
    return {"gpus": gpus, "configuration": what, "images_per_s": ips, "projected": True,
            "efficiency": ips / (gpus * one_gpu), **extra}


# ---- the pipeline on one shared device, measured --------------------------------------------
def shared_report(path: Path, device: torch.device, clock: _Clock | None = None) -> dict:
    """What a pipeline whose ranks shared one device cost against the single process on it,
    from a benchmarks/throughput.py result with `--ranks 1,N`: images/s side by side, and per
    rank the fractions of wall time spent computing, waiting to receive, waiting for sends,
    staging through host memory (estimated: the boundary bytes at the pinned copy speed
    measured here; the device-to-host half falls under "other", the host-to-device half
    under the receive wait) and the rest (Python, posting)."""
    res = json.loads(path.read_text())
    a, results = res["args"], res["results"]
    clock = clock or _Clock(device)
    report = {"source": str(path), "rows": []}
    for label, r in results.items():
        if " ranks" not in label or "torch.pipelining" in label or \
                r.get("method", "").startswith("bp"):
            continue        # BP's rows (DDP, torch.pipelining): no pipeline to project
        label = label.replace(" (sharing 1 GPU: functional check)", "")
        method = label.split(" ")[0]
        variant = label[label.index(" ["):] if label.endswith("]") else ""
        single = results.get(f"{method} single{variant}")
        flags = dict(a.get("variants") or []).get(variant.strip(" []"), ())
        bf16 = device.type == "cuda" and "--train.bf16=false" not in flags
        cfg = _cfg(a["model"], a["K"], method)
        _, mods = build_local_modules(cfg, _spec(a["image"]))
        parts = r.get("partition") or balanced_partition([1.0] * len(mods), len(r["per_rank"]))
        bounds = _boundaries(mods, window_plan(cfg, len(mods)), parts, a["image"], a["batch"],
                             2 if bf16 else 4)
        # seconds per byte through host memory: half a device -> host -> device round trip
        big = max((b["bytes"] for b in bounds), default=0)
        per_byte = staged_round_trip(big, device, clock) / 2 / big if big else 0.0
        step_s = a["batch"] / r["median"]
        ranks = []
        for rk, split in sorted(r["per_rank"].items(), key=lambda kv: int(kv[0])):
            rk = int(rk)
            moved = sum(b["bytes"] for b in bounds[max(rk - 1, 0):rk + 1])
            staging = moved * per_byte / step_s
            busy = split["compute_frac"] + split["recv_wait_frac"] + split["send_wait_frac"]
            ranks.append({"rank": rk, "modules": parts[rk], "compute": split["compute_frac"],
                          "recv_wait": split["recv_wait_frac"],
                          "send_wait": split["send_wait_frac"],
                          "staging_estimated": staging, "other": max(0.0, 1 - busy)})
        report["rows"].append({
            "configuration": label, "measured": True,
            "pipeline_images_per_s": r["median"],
            "single_process_images_per_s": single["median"] if single else None,
            "pipeline_vs_single": r["median"] / single["median"] if single else None,
            "single_process_cuda_graph": (single or {}).get("cuda_graph"),
            "boundary_bytes": [b["bytes"] for b in bounds], "per_rank": ranks})
    return report


def _print_measure(out: dict) -> None:
    say(f"Projected to one GPU per stage or replica ({out['device']} stage times, "
        f"link {out['assumptions']['link_bytes_per_s'] / 1e9:.0f} GB/s):")
    for r in out["projected"]:
        vs = r.get("vs_single_process_measured")
        say(f"  {r['gpus']} GPUs  {r['configuration']:<64} "
            f"{r['images_per_s']:>10,.0f} img/s projected  (efficiency "
            f"{r['efficiency']:.0%}" + (f"; {vs:.2f}x the measured single process)" if vs
                                        else ")"))
    for row in (out.get("shared_gpu") or {}).get("rows", []):
        single = row["single_process_images_per_s"]
        say(f"Measured on one shared device: {row['configuration']} "
            f"{row['pipeline_images_per_s']:,.0f} img/s against the single process's "
            f"{single:,.0f} ({row['pipeline_vs_single']:.2f}x)" if single else
            f"Measured: {row['configuration']} {row['pipeline_images_per_s']:,.0f} "
            f"img/s")
        for rk in row["per_rank"]:
            say(f"  rank {rk['rank']} ({rk['modules']} modules): compute "
                f"{rk['compute']:.0%}, receive wait {rk['recv_wait']:.0%}, send wait "
                f"{rk['send_wait']:.0%}, other {rk['other']:.0%}; host staging "
                f"{rk['staging_estimated']:.0%} (estimated)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.projection", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="stage times on one device -> 2, 4, 8 GPUs")
    m.add_argument("--device", default="cuda")
    m.add_argument("--model", default="resnet110")
    m.add_argument("--K", type=int, default=55)
    m.add_argument("--batch", type=int, default=1024)
    m.add_argument("--image", default="3,32,32")
    m.add_argument("--stages", default="2,4,8")
    m.add_argument("--microbatches", type=int, default=8, help="BP 1F1B micro-batches")
    m.add_argument("--steps", type=int, default=6)
    m.add_argument("--warmup", type=int, default=2)
    m.add_argument("--link-gbps", type=float, default=100.0,
                   help="GB/s between two GPUs (NVLink 4 on H100: 450 nominal per direction; "
                        "100 is a conservative effective figure)")
    m.add_argument("--precision", default="bf16", choices=["bf16", "fp32"],
                   help="bf16 autocast (the GPU default) or fp32; channels-last either way")
    m.add_argument("--shared", help="a benchmarks/throughput.py JSON with --ranks 1,N run on "
                                    "this device")
    m.add_argument("--json")
    v = sub.add_parser("validate", help="the model against a CPU throughput result")
    v.add_argument("results", type=Path, help="a throughput-cpu-*.json results file")
    v.add_argument("--json", type=Path)
    f = sub.add_parser("flops", help="1-64 GPUs from FLOP counts and ASSUMPTIONS")
    f.add_argument("--json", type=Path)
    args, extra = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    if extra and args.command != "measure":
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    out: dict = {}
    if args.command == "measure":
        args.image = tuple(int(x) for x in args.image.split(","))
        args.stages = [int(x) for x in args.stages.split(",")]
        args.overrides = extra          # train overrides, e.g. --train.compile=on
        if args.device == "cuda" and not torch.cuda.is_available():
            print("pipemlaan: error: no CUDA device is visible; pass --device cpu",
                  file=sys.stderr)
            return 2
        if args.device == "cpu":
            torch.set_num_threads(1)
        out = measure(args)
        _print_measure(out)
    elif args.command == "validate":
        torch.set_num_threads(1)
        out["validation"] = validate(args.results)
        for r in out["validation"]["rows"]:
            say(f"{r['configuration']:<22} predicted {r['predicted']:7.1f}  measured "
                f"{r['measured']:7.1f} images/s  ({r['error']:+.0%})")
    else:
        torch.set_num_threads(1)
        out["assumptions"] = ASSUMPTIONS
        for key, layouts, title in (
                ("projections", LAYOUTS, f"DGL+MLAAN, batch 1024 per replica ({ASSUMPTIONS})"),
                ("eight_nodes", EIGHT_NODES, "8 nodes x 8 GPUs (pipelines inside a node up to "
                                             "8 stages, gradient all-reduce across nodes)")):
            out[key] = {}
            for model, K in (("resnet110", 55), ("resnet32", 16)):
                rows = project_flops(model, K, "dgl+mlaan", 1024, layouts)
                out[key][f"{model} K={K}"] = rows
                say(f"{model} K={K}, {title}, projected")
                for r in rows:
                    say(f"  {r['gpus']:>3} GPUs = {r['stages']:>2} stages x "
                        f"{r['replicas']:>2} replicas: {r['images_per_s']:9.0f} img/s "
                        f"projected, speed-up {r['speedup']:5.1f}x, efficiency "
                        f"{r['efficiency']:.0%}, stage balance {r['balance']:.0%}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
