"""How well counted costs predict a module's training time, and the fit of their constants.

  OMP_NUM_THREADS=1 python -m benchmarks.partition_fit            # CPU, ~5 min on 2 cores
  OMP_NUM_THREADS=1 python -m benchmarks.partition_fit --quick    # two configurations, ~1 min

For each configuration (model, K, method, image, batch) every local module's training pass
(body forward, heads forward and backward, body backward: engine/partition.py measure_costs)
is timed at the run's batch on this device, the fastest of `--repeats` (the least disturbed by
other load), and counted (engine/costs.py: multiply-adds, elements written, operators). A
non-negative least-squares fit of seconds = 3 x (2 MACs / F + 4 elements / B + ops x L) gives
the device kind's constants; reported per configuration: the counted model's relative error
per module and per stage of the automatic partition on 2 and 4 ranks, with the fitted constants
and with the ones in engine/costs.py CALIBRATION, and the error of the partition the old timed
method (batch 32, one measurement) would predict. Results: JSON + Markdown in
benchmarks/results/partition-fit-<device>-<date>.*
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import nnls

from benchmarks import launch
from pipemlaan.config import load_config, method_flags
from pipemlaan.data import dataset_spec
from pipemlaan.engine.costs import CALIBRATION, ModuleCost, count_module_costs
from pipemlaan.engine.partition import (balanced_partition, feasible, measure_costs,
                                        stage_bounds, window_spans)
from pipemlaan.local.module import build_local_modules, window_plan

RESULTS = Path(__file__).resolve().parent / "results"

CONFIGS = [   # (model, K, method, C,H,W, batch)
    ("resnet20", 4, "dgl+mlaan", (1, 28, 28), 128),
    ("resnet20", 4, "dgl", (1, 28, 28), 128),
    ("resnet20", 4, "bp", (1, 28, 28), 128),
    ("resnet32", 16, "dgl+mlaan", (3, 32, 32), 64),
    ("resnet32", 8, "infopro+mlaan", (3, 32, 32), 64),
    ("resnet56", 28, "dgl+mlaan", (3, 32, 32), 32),
]


def _setup(model, K, method, image, batch):
    flags = [f"--model.name={model}", f"--model.K={1 if method == 'bp' else K}",
             "--data.name=synthetic", f"--data.synthetic_image=[{image[0]},{image[1]},{image[2]}]",
             f"--train.batch_size={batch}", *method_flags(method)]
    cfg = load_config(None, flags)
    spec = dataset_spec(cfg.data)
    torch.manual_seed(0)
    _, modules = build_local_modules(cfg, spec)
    return cfg, spec, modules


def measure(conf, repeats: int) -> dict:
    model, K, method, image, batch = conf
    cfg, spec, modules = _setup(*conf)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *image, generator=g)
    y = torch.randint(0, spec.num_classes, (batch,), generator=g)
    runs = [measure_costs(modules, x, y, repeats=1) for _ in range(repeats)]
    timed = [min(r[k] for r in runs) for k in range(len(modules))]
    small = measure_costs(modules, x[:32], y[:32], repeats=1)     # what the old partition used
    counted = count_module_costs(modules, image)
    spans = window_spans(window_plan(cfg, len(modules)))
    return {"config": f"{model} K={len(modules)} {method} {image} batch {batch}",
            "batch": batch, "timed": timed, "timed_batch32": small, "spans": spans,
            "counts": [vars(c) for c in counted]}


def fit(rows: list[dict]) -> tuple[float, float, float]:
    """F, B, L minimising the squared relative error over every module."""
    A, b = [], []
    for r in rows:
        for c, t in zip(r["counts"], r["timed"]):
            feats = [6 * c["macs"] * r["batch"], 12 * c["elements"] * r["batch"], 3 * c["ops"]]
            A.append([f / t for f in feats])
            b.append(1.0)
    coef, _ = nnls(np.array(A), np.array(b))
    inv = [1 / v if v > 0 else float("inf") for v in coef[:2]]
    return inv[0], inv[1], float(coef[2])


def errors(rows: list[dict], calib: tuple[float, float, float]) -> list[dict]:
    out = []
    for r in rows:
        pred = [_seconds(c, r["batch"], calib) for c in r["counts"]]
        mod_err = [abs(p - t) / t for p, t in zip(pred, r["timed"])]
        stages = {}
        K = len(r["timed"])
        for n in (2, 4):
            if n > K or not feasible(K, n, r["spans"]):
                continue
            for name, costs in (("counted", pred), ("timed at batch 32", r["timed_batch32"])):
                parts = balanced_partition(costs, n, r["spans"])
                real = [sum(r["timed"][slice(*stage_bounds(parts, s))]) for s in range(n)]
                guess = [sum(costs[slice(*stage_bounds(parts, s))]) for s in range(n)]
                scale = sum(real) / sum(guess)    # relative: a partition only needs ratios
                stages[f"{n} ranks, {name}"] = {
                    "partition": parts,
                    "stage_error": max(abs(g * scale - t) / t for g, t in zip(guess, real)),
                    "slowest_stage_s": max(real),
                }
            best = min(_all_partitions(K, n, r["spans"]),
                       key=lambda p: max(sum(r["timed"][slice(*stage_bounds(p, s))])
                                         for s in range(n)))
            stages[f"{n} ranks, best"] = {
                "partition": best, "slowest_stage_s":
                max(sum(r["timed"][slice(*stage_bounds(best, s))]) for s in range(n))}
        out.append({"config": r["config"], "module_error_median": float(np.median(mod_err)),
                    "module_error_max": max(mod_err), "stages": stages})
    return out


def _seconds(c: dict, batch: int, calib) -> float:
    F, B, L = calib
    return 3 * (2 * c["macs"] * batch / F + 4 * c["elements"] * batch / B + c["ops"] * L)


def _all_partitions(K: int, n: int, spans):
    """Every feasible partition of K modules on n ranks (small K only)."""
    from itertools import combinations
    from pipemlaan.engine.partition import inside
    for cuts in combinations(range(1, K), n - 1):
        b = [0, *cuts, K]
        parts = [b[i + 1] - b[i] for i in range(n)]
        if not any(inside(b[i], b[i + 1], spans) for i in range(n)):
            yield parts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.partition_fit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    confs = CONFIGS[:2] if args.quick else CONFIGS
    rows = []
    for conf in confs:
        rows.append(measure(conf, args.repeats))
        print(f"timed {rows[-1]['config']}: " + " ".join(f"{t * 1e3:.1f}" for t in
                                                         rows[-1]["timed"]) + " ms", flush=True)
    fitted = fit(rows)
    kind = "cpu"
    report = {"date": dt.datetime.now().isoformat(timespec="minutes"),
              "machine": launch.machine(), "fitted": fitted, "calibration": CALIBRATION[kind],
              "with_fitted": errors(rows, fitted),
              "with_calibration": errors(rows, CALIBRATION[kind]), "rows": rows}
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M")
    base = RESULTS / f"partition-fit-{kind}-{stamp}"
    base.with_suffix(".json").write_text(json.dumps(report, indent=1))
    lines = [f"# Counted costs against timed modules ({kind}, {stamp})", "",
             f"Command: `python -m benchmarks.partition_fit {' '.join(argv or sys.argv[1:])}`",
             "", f"Fitted F={fitted[0]:.3g} FLOP/s, B={fitted[1]:.3g} B/s, L={fitted[2]:.3g} s/op; "
             f"engine/costs.py CALIBRATION[{kind!r}] = {CALIBRATION[kind]}", "",
             "| configuration | module error median / max | stage error, counted (2 / 4 ranks) "
             "| stage error, timed at batch 32 (2 / 4 ranks) | slowest stage: counted / timed-32 / best "
             "partition (ms, 2 ranks) |", "|---|---|---|---|---|"]
    for e in report["with_calibration"]:
        st = e["stages"]
        def get(n, name, key="stage_error"):
            v = st.get(f"{n} ranks, {name}", {}).get(key)
            return "-" if v is None else (f"{v:.0%}" if key == "stage_error" else f"{v * 1e3:.1f}")
        lines.append(f"| {e['config']} | {e['module_error_median']:.0%} / "
                     f"{e['module_error_max']:.0%} | {get(2, 'counted')} / {get(4, 'counted')} | "
                     f"{get(2, 'timed at batch 32')} / {get(4, 'timed at batch 32')} | "
                     f"{get(2, 'counted', 'slowest_stage_s')} / "
                     f"{get(2, 'timed at batch 32', 'slowest_stage_s')} / "
                     f"{get(2, 'best', 'slowest_stage_s')} |")
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {base}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
