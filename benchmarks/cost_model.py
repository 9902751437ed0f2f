"""A cost model of pipemlaan's throughput, checked against measurements and used to project.

Model (async pipeline, S stages, D data-parallel replicas of the whole pipeline):
  t_stage(r) = compute(r) + (1 - overlap) * comm(r) + allreduce(r)
  compute(r) = sum of the measured per-module step costs of the modules rank r owns
  comm(r)    = (bytes received + bytes sent per step by rank r) / link bandwidth
  allreduce  = 2 (D-1)/D * gradient bytes of the stage / bandwidth     (D > 1 only)
  images/s   = D * batch / max_r t_stage(r)
A local-learning pipeline has no backward locking across the whole network and no steady-state
bubble, so the slowest stage sets the pace; that is the whole model.

  python -m benchmarks.cost_model --validate benchmarks/results/throughput-cpu-<stamp>.json
      measures per-module costs on this machine (one thread, the benchmark's model/batch) and
      compares the predicted single-process and pipeline images/s with the measured ones;
  python -m benchmarks.cost_model --project
      projects 1..64-GPU set-ups (stages x replicas), and every layout of 8 nodes x 8 GPUs,
      for ResNet-110 K=55 and ResNet-32 K=16 at CIFAR shapes from FLOP counts and stated
      assumptions about the GPUs and links (batch per replica: train.batch_size = D x 1024).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import methods
from pipemlaan.config import Config
from pipemlaan.data import DatasetSpec
from pipemlaan.engine.partition import balanced_partition, measure_costs, window_spans
from pipemlaan.local.module import build_local_modules, window_plan


@dataclass
class Setup:
    costs: list[float]            # seconds per step, per module
    boundary_bytes: list[int]     # bytes of module k's output activation (per step)
    grad_bytes: list[int]         # gradient bytes of module k (parameters incl. heads)
    batch: int


def predict(setup: Setup, partition: list[int], bandwidth: float, overlap: float = 1.0,
            replicas: int = 1, dp_bandwidth: float | None = None,
            grads_back: int = 1) -> dict:
    """Predicted images/s and per-stage times for one partition (module counts per rank)."""
    times, lo = [], 0
    for r, n in enumerate(partition):
        hi = lo + n
        compute = sum(setup.costs[lo:hi])
        moved = 0
        if r > 0:                      # activation in, window gradient(s) out
            moved += setup.boundary_bytes[lo - 1] * (1 + grads_back)
        if r < len(partition) - 1:     # activation out, window gradient(s) in
            moved += setup.boundary_bytes[hi - 1] * (1 + grads_back)
        comm = moved / bandwidth
        allreduce = 0.0
        if replicas > 1:
            bw = dp_bandwidth or bandwidth
            allreduce = 2 * (replicas - 1) / replicas * sum(setup.grad_bytes[lo:hi]) / bw
        times.append(compute + (1 - overlap) * comm + allreduce)
        lo = hi
    slowest = max(times)
    return {"images_per_s": replicas * setup.batch / slowest, "stage_s": times,
            "balance": sum(times) / len(times) / slowest}


def measure_setup(model: str, K: int, method: str, batch: int, image: tuple[int, int, int],
                  classes: int = 10, repeats: int = 3) -> Setup:
    c, h, w = image
    spec = DatasetSpec("synthetic", c, (h, w), classes, (0.0,) * c, (1.0,) * c)
    _, modules = build_local_modules(_cfg(model, K, method), spec)
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


def flop_setup(model: str, K: int, method: str, batch: int, image, flops_per_s: float,
               classes: int = 10) -> Setup:
    """Per-module costs from counted multiply-adds (x2 FLOPs, x3 for forward + backward)."""
    c, h, w = image
    spec = DatasetSpec("synthetic", c, (h, w), classes, (0.0,) * c, (1.0,) * c)
    _, modules = build_local_modules(_cfg(model, K, method), spec)
    macs = [0]

    def hook(mod, inp, out):
        if isinstance(mod, torch.nn.Conv2d):
            macs[0] += out.numel() * mod.in_channels // mod.groups * \
                mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, torch.nn.Linear):
            macs[0] += out.numel() * mod.in_features
    handles = [m.register_forward_hook(hook) for mod in modules for m in mod.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    costs, bytes_out, grads = [], [], []
    with torch.no_grad():
        z = torch.zeros(1, c, h, w)
        for mod in modules:
            macs[0] = 0
            out = mod.body(z)
            for head in (mod.g, mod.h):
                if head is not None:
                    head(out, torch.zeros(1, dtype=torch.long), z if z.shape[1] == c else
                         torch.zeros(1, c, h, w))
            costs.append(3 * 2 * macs[0] * batch / flops_per_s)
            bytes_out.append(out.numel() * batch * 2)     # bf16 activations on GPUs
            grads.append(sum(p.numel() * 4 for p in mod.parameters() if p.requires_grad))
            z = out
    for hd in handles:
        hd.remove()
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


ASSUMPTIONS = {
    "gpu_flops_per_s": 60e12,   # effective bf16 FLOP/s of an H100 on small-channel CIFAR convs
    "nvlink_bytes_per_s": 150e9,
    "infiniband_bytes_per_s": 25e9,
    "gpus_per_node": 8,
}


LAYOUTS = [(1, 1), (4, 4), (8, 8), (8, 4), (64, 8), (64, 16)]     # (GPUs, stages)
EIGHT_NODES = [(64, s) for s in (4, 8, 16, 32)]                    # 8 nodes x 8 GPUs


def project(model: str, K: int, method: str, batch_per_replica: int,
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
        part = balanced_partition(setup.costs, stages, spans)
        # stages inside a node talk over NVLink; replicas of one stage sit on different nodes
        # once there are more than one node's worth of GPUs
        dp_bw = a["nvlink_bytes_per_s"] if gpus <= a["gpus_per_node"] else \
            a["infiniband_bytes_per_s"]
        p = predict(setup, part, bandwidth=a["nvlink_bytes_per_s"], overlap=1.0,
                    replicas=replicas, dp_bandwidth=dp_bw)
        rows.append({"gpus": gpus, "stages": stages, "replicas": replicas,
                     "images_per_s": p["images_per_s"], "speedup": p["images_per_s"] / base,
                     "efficiency": p["images_per_s"] / base / gpus, "balance": p["balance"]})
    return rows


def _cfg(model: str, K: int, method: str) -> Config:
    """A default config for `method` written as dgl, dgl+mlaan, infopro+mlaan, ..."""
    cfg = Config()
    cfg.model.name, cfg.model.K = model, K
    cfg.method.name, cfg.method.mlm, cfg.method.lam = methods.parse(method)
    return cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cost_model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--validate", type=Path, help="a throughput-cpu-*.json results file")
    p.add_argument("--project", action="store_true")
    p.add_argument("--json", type=Path, help="write the figures here too")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)
    out = {}
    if args.validate:
        out["validation"] = validate(args.validate)
        for r in out["validation"]["rows"]:
            print(f"{r['configuration']:<22} predicted {r['predicted']:7.1f}  measured "
                  f"{r['measured']:7.1f} images/s  ({r['error']:+.0%})")
    if args.project:
        out["assumptions"] = ASSUMPTIONS
        for key, layouts, title in (
                ("projections", LAYOUTS, f"DGL+MLAAN, batch 1024 per replica ({ASSUMPTIONS})"),
                ("eight_nodes", EIGHT_NODES, "8 nodes x 8 GPUs (pipelines inside a node up to "
                                             "8 stages, gradient all-reduce across nodes)")):
            out[key] = {}
            for model, K in (("resnet110", 55), ("resnet32", 16)):
                rows = project(model, K, "dgl+mlaan", 1024, layouts)
                out[key][f"{model} K={K}"] = rows
                print(f"{model} K={K}, {title}")
                for r in rows:
                    print(f"  {r['gpus']:>3} GPUs = {r['stages']:>2} stages x "
                          f"{r['replicas']:>2} replicas: {r['images_per_s']:9.0f} img/s, "
                          f"speed-up {r['speedup']:5.1f}x, efficiency {r['efficiency']:.0%}, "
                          f"stage balance {r['balance']:.0%}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
