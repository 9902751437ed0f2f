"""The paper's Table 3 (memory per device) measured on our code: BP and the local methods on
ResNet-32 K=16 and ResNet-110 K=55 at CIFAR shapes and ResNet-34 K=17 at ImageNet shapes, one
process and every rank of an R-rank pipeline, with the paper's figures beside ours.

On CPU the figures are pipemlaan.profile's device-independent accounting (saved-for-backward +
parameters, gradients, buffers and optimizer state + P2P buffers); `--device cuda` measures each
rank's stage alone on the GPU (CUDA's allocator peak, NVML, the stage's median step time), and
`--precisions fp32,bf16` measures each row in fp32 (the paper's setting) and in bf16. Rows run
in order of importance (BP and DGL+MLAAN first; fp32 before bf16; ResNet-110 first) and `--json`
is rewritten after every row, so a run cut short by a time limit keeps what it measured.

  python -m benchmarks.table3 --ranks 4 --batch 128 --imagenet-batch 16     (make profile)
  python -m benchmarks.table3 --ranks 4 --batch 1024 --imagenet-batch 128 --device cuda \
      --precisions fp32,bf16 --steps 2 --warmup 1 --json benchmarks/results/memory-cuda.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from rich.table import Table

from pipemlaan.config import load_config, parse_method
from pipemlaan.data import DatasetSpec
from pipemlaan.engine.partition import balanced_partition, window_spans
from pipemlaan.errors import PipemlaanError
from pipemlaan.local.module import build_local_modules, window_plan
from pipemlaan.profile import profile_memory, stage_alone
from pipemlaan.ui import console

SHAPES = {"cifar": (3, 32, 32, 10), "imagenet": (3, 224, 224, 1000)}


def _spec(kind: str, name: str = "synthetic") -> DatasetSpec:
    c, h, w, n = SHAPES[kind]
    return DatasetSpec(name, c, (h, w), n, (0.0,) * c, (1.0,) * c)


TABLE3 = [("ResNet-32 (K=16)", "resnet32", 16, "cifar"),
          ("ResNet-110 (K=55)", "resnet110", 55, "cifar"),
          ("ResNet-34 (K=17)", "resnet34", 17, "imagenet")]
METHODS = [(label, *parse_method(label))
           for label in ("bp", "dgl", "dgl+mlaan", "infopro", "infopro+mlaan")]


# The paper's Table 3 (GB, one GPU): BP and MLAAN (DGL+MLAAN) per network.
PAPER_TABLE3 = {("ResNet-32 (K=16)", "bp"): 3.37, ("ResNet-32 (K=16)", "dgl+mlaan"): 2.62,
                ("ResNet-110 (K=55)", "bp"): 9.26, ("ResNet-110 (K=55)", "dgl+mlaan"): 2.76,
                ("ResNet-34 (K=17)", "bp"): 10.74, ("ResNet-34 (K=17)", "dgl+mlaan"): 9.09}


PRECISIONS = {"fp32": ["--train.bf16=false"], "bf16": ["--train.bf16=true"]}
# the order rows are measured in: what the paper reports first, then the deepest network
NET_ORDER = ("resnet110", "resnet32", "resnet34")


def table3_order(nets, methods, precisions) -> list[tuple]:
    """(net, method, precision) in order of importance: BP and DGL+MLAAN (the paper's
    figures) before the other methods, fp32 (the paper's setting) before bf16, ResNet-110
    before ResNet-32 before ResNet-34."""
    def key(item):
        (_, model, _, _), (mlabel, *_), prec = item
        return (mlabel not in ("bp", "dgl+mlaan"), list(precisions).index(prec),
                NET_ORDER.index(model) if model in NET_ORDER else len(NET_ORDER))
    return sorted(((n, m, p) for n in nets for m in methods for p in precisions), key=key)


def table3(ranks: int, batch: int, imagenet_batch: int, methods=METHODS, nets=TABLE3,
           device: torch.device = torch.device("cpu"), cfg_overrides=(),
           alone: bool | None = None, steps: int = 6, warmup: int = 2,
           precisions=("fp32",), on_row=None) -> list[dict]:
    """Memory of one process and of each rank of an R-rank pipeline, a row per network,
    method and precision (`table3_order`). On CPU the accounting of `profile_memory` (CPU runs
    are fp32 whatever the precision says); on CUDA (or with alone=True) each rank's stage alone
    on the device (`stage_alone`: the allocator's peak on CUDA, and its median step time).
    `on_row(rows)` is called after every row."""
    alone = device.type == "cuda" if alone is None else alone
    rows = []
    for (label, model, K, kind), (mlabel, name, mlm, lam), prec in table3_order(
            nets, methods, precisions):
        cfg = load_config(None, [*PRECISIONS[prec], *cfg_overrides])
        cfg.model.name, cfg.model.K = model, K
        cfg.method.name, cfg.method.mlm, cfg.method.lam = name, mlm, lam
        b = imagenet_batch if kind == "imagenet" else batch
        spec = _spec(kind)
        row = {"network": label, "method": mlabel, "precision": prec, "batch": b,
               "paper_gb": PAPER_TABLE3.get((label, mlabel))}
        t0 = time.perf_counter()
        if alone:
            torch.manual_seed(0)
            _, modules = build_local_modules(cfg, spec)
            plan = window_plan(cfg, len(modules))
            one = stage_alone(cfg, spec, modules, plan, [len(modules)], 0, b, device,
                              steps=steps, warmup=warmup)
            row.update(single_process_bytes=one["peak_bytes"], single_step_s=one["step_s"])
            if name != "bp" and ranks > 1:
                parts = balanced_partition([1.0] * len(modules), ranks, window_spans(plan))
                per = [stage_alone(cfg, spec, modules, plan, parts, r, b, device,
                                   steps=steps, warmup=warmup) for r in range(ranks)]
                row.update(partition=parts, per_rank_bytes=[p["peak_bytes"] for p in per],
                           per_rank_step_s=[p["step_s"] for p in per])
            else:
                row["per_rank_bytes"] = None
        else:
            one = profile_memory(cfg, spec, 1, b)[0]
            per_rank = None
            if name != "bp" and ranks > 1:
                # balanced over equal module costs, as the stage-alone path: a partition from
                # timed costs would move with the machine's load, and the figures with it
                parts = balanced_partition([1.0] * K, ranks, window_spans(window_plan(cfg, K)))
                per_rank = profile_memory(cfg, spec, ranks, b, partition=parts)
                row["partition"] = parts
            row["single_process_bytes"] = one["total_bytes"]
            row["per_rank_bytes"] = [r["total_bytes"] for r in per_rank] if per_rank \
                else None
            # the parts, so a figure can be scaled to another batch: what is saved for
            # backward and the P2P buffers grow with it, the state does not
            row["single_process_parts"] = _parts(one)
            row["per_rank_parts"] = [_parts(r) for r in per_rank] if per_rank else None
        rows.append(row)
        per = row["per_rank_bytes"] or []
        console.print(f"  measured {label} {mlabel} {prec}: 1 process "
                      f"{_gib(row['single_process_bytes'])} GiB"
                      + (f", ranks {' / '.join(_gib(p) for p in per)} GiB" if per else "")
                      + (f" (paper {row['paper_gb']:.2f} GB)" if row["paper_gb"] else "")
                      + f" ({time.perf_counter() - t0:.0f} s)", style="dim", highlight=False,
                      markup=False, soft_wrap=True)
        if on_row is not None:
            on_row(rows)
    return rows


def _parts(r: dict) -> dict:
    return {k: r[k] for k in ("activation_bytes", "state_bytes", "comm_bytes")}


def scaled_bytes(parts: dict, factor: float) -> float:
    """A CPU-accounting figure at `factor` times the batch it was measured at."""
    return parts["state_bytes"] + factor * (parts["activation_bytes"] + parts["comm_bytes"])


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def render_table3(rows: list[dict], ranks: int) -> Table:
    t = Table(title=f"Memory per device (GiB; saved-for-backward + params/grads/optimizer "
                    f"+ P2P buffers), {ranks}-rank pipelines")
    t.add_column("network")
    t.add_column("method")
    t.add_column("precision")
    t.add_column("1 process", justify="right")
    for r in range(ranks):
        t.add_column(f"rank {r}", justify="right")
    t.add_column("max rank / BP", justify="right")
    t.add_column("paper (GB)", justify="right")
    bp = {(row["network"], row.get("precision")): row["single_process_bytes"]
          for row in rows if row["method"] == "bp"}
    for row in rows:
        per = row["per_rank_bytes"] or []
        ref = bp.get((row["network"], row.get("precision")))
        ratio = max(per) / ref if per and ref else None
        t.add_row(row["network"], row["method"], row.get("precision", "-"),
                  _gib(row["single_process_bytes"]),
                  *[_gib(b) for b in per] + ["-"] * (ranks - len(per)),
                  f"{ratio:.0%}" if ratio else "-",
                  f"{row['paper_gb']:.2f}" if row.get("paper_gb") else "-")
    return t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.table3", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--batch", type=int, default=128, help="CIFAR rows' batch")
    p.add_argument("--imagenet-batch", type=int, default=16)
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--nets", default="", help="rows: models to keep, e.g. resnet34,resnet110 "
                   "(default: all three); MODEL:K adds another network at CIFAR shapes (e.g. "
                   "resnet8:4, what the GPU check's SMOKE=1 runs)")
    p.add_argument("--alone", action="store_true", help="on CPU: each rank's stage alone, as "
                   "on CUDA, instead of the in-process accounting")
    p.add_argument("--methods", default="", help="methods to keep, e.g. bp,dgl+mlaan "
                   "(default: all five)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                   help="cuda: each rank's stage alone on the GPU (allocator peak, NVML, step "
                        "time, saved-for-backward bytes of the warm-up steps) instead of the "
                        "CPU accounting; auto: cuda when one is visible (make profile)")
    p.add_argument("--precisions", default="fp32", help="on CUDA: fp32 (the paper's setting), "
                   "bf16 or both, e.g. fp32,bf16 (in that order)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per stage")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    args, overrides = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise PipemlaanError("--device cuda but no CUDA device is visible")
        wanted = [n for n in args.nets.split(",") if n]
        nets = [n for n in TABLE3 if not wanted or n[1] in wanted]
        for spec in (n for n in wanted if ":" in n):
            model, _, K = spec.partition(":")
            if not K.isdigit():
                raise PipemlaanError(f"--nets {spec}: write MODEL:K, e.g. resnet8:4")
            nets.append((f"{model} (K={K})", model, int(K), "cifar"))
        methods = [m for m in METHODS
                   if not args.methods or m[0] in args.methods.split(",")]
        if not nets or not methods:
            raise PipemlaanError("--nets / --methods keep no row of Table 3: choose from "
                                 f"{[n[1] for n in TABLE3]} and {[m[0] for m in METHODS]}")
        precisions = [x for x in args.precisions.split(",") if x]
        if not precisions or any(x not in PRECISIONS for x in precisions):
            raise PipemlaanError(f"--precisions={args.precisions}: use fp32, bf16 or "
                                 f"fp32,bf16")

        def save(rows, complete=False):
            if args.json:
                Path(args.json).write_text(json.dumps(
                    {"ranks": args.ranks, "device": args.device, "complete": complete,
                     "rows": rows}, indent=1))
        rows = table3(args.ranks, args.batch or 128, args.imagenet_batch, methods=methods,
                      nets=nets, device=torch.device(args.device), cfg_overrides=overrides,
                      alone=args.alone or None, steps=args.steps, warmup=args.warmup,
                      precisions=precisions, on_row=save)
        console.print(render_table3(rows, args.ranks))
        save(rows, complete=True)
    except PipemlaanError as e:
        print(f"pipemlaan: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
