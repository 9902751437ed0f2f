"""Time to accuracy on the same cores: DDP BP, the DGL and DGL+MLAAN pipelines, and BP in one
process, on real Fashion-MNIST.

  python -m benchmarks.time_to_accuracy                        # 2 seeds, ~40 min on 2 cores
  python -m benchmarks.time_to_accuracy --seeds 0 --epochs 1 --train-subset 5000 --targets 25,20

Every configuration gets the same cores: the single process runs with all of them as torch
threads, N ranks (DDP, or a pipeline of N stages) with cpu_count/N threads each. All train
ResNet-20 (K=4 for the local methods) from `configs/fmnist_*_cpu.toml` with the same seed,
global batch, learning-rate schedule and epochs; BP on N ranks is torch's
DistributedDataParallel (benchmarks/ddp_bp.py). Each run evaluates on the whole test set every
`--eval-every` steps (train.eval_every_steps) and at every epoch's end; the time counted is
training time (each eval line's `train_s`: evaluation excluded), and a target's time is the
first evaluation whose top-1 error is at or below it. Runs are sequential, so each one has the
machine to itself; seeds are interleaved (every configuration on seed 0, then on seed 1, ...).
Results: JSON + Markdown + a PNG of test error against training time in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks import launch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# label -> (config file, ranks: 1 = one process, None = --ranks, program)
CONFIGS = {
    "BP one process": ("configs/fmnist_bp_cpu.toml", 1, None),
    "BP DDP": ("configs/fmnist_bp_cpu.toml", None, ["-m", "benchmarks.ddp_bp"]),
    "DGL pipeline": ("configs/fmnist_dgl_cpu.toml", None, None),
    "DGL+MLAAN pipeline": ("configs/fmnist_mlaan_cpu.toml", None, None),
}


def run(args, label: str, seed: int, workdir: Path) -> dict:
    config, ranks, program = CONFIGS[label]
    ranks = ranks or args.ranks
    threads = max(1, (os.cpu_count() or 1) // ranks)
    tag = f"{label.replace(', ', '-').replace(' ', '_').replace('+', '_')}-s{seed}"
    flags = ["--config", config, f"--train.epochs={args.epochs}", f"--train.seed={seed}",
             f"--train.threads={threads}", f"--train.eval_every_steps={args.eval_every}",
             f"--data.train_subset={args.train_subset}",
             f"--data.test_subset={args.test_subset}", f"--run.dir={workdir}",
             f"--run.name={tag}", "--run.overwrite=true", "--run.progress=false",
             "--run.log_every=50", "--pipeline.mode=async", "--run.tensorboard=false"]
    launch.run(launch.train_command(ranks, flags, program=program), launch.run_env(threads),
               args.timeout)
    lines = [json.loads(x) for x in (workdir / tag / "metrics.jsonl").read_text().splitlines()]
    curve = [{"step": r["step"], "train_s": r["train_s"], "error": r["test_top1_error"]}
             for r in lines if r.get("kind") == "eval"]
    summary = json.loads((workdir / tag / "summary.json").read_text())
    reached = {str(t): next((c["train_s"] for c in curve if c["error"] <= t), None)
               for t in args.targets}
    out = {"configuration": label, "seed": seed, "ranks": ranks, "threads_per_rank": threads,
           "curve": curve, "final_error": curve[-1]["error"], "train_s": curve[-1]["train_s"],
           "images_per_s": summary["images_per_s"], "time_to_target_s": reached}
    print(f"{label:<20} seed {seed}, {ranks} x {threads} threads: final {out['final_error']:.2f}%"
          f" after {out['train_s']:.0f} s; " + ", ".join(
              f"{t}%: {'%.0f s' % s if s is not None else 'not reached'}"
              for t, s in reached.items()), flush=True)
    return out


def _mean(values: list) -> str:
    """'mean ± std (n)' over the seeds that reached it; 'not reached' names how many did not."""
    got = [v for v in values if v is not None]
    if not got:
        return "not reached"
    text = f"{statistics.fmean(got):.0f}" + (f" ± {statistics.stdev(got):.0f}"
                                             if len(got) > 1 else "")
    missed = len(values) - len(got)
    return text + (f" ({missed} seed{'s' * (missed > 1)} not reached)" if missed else "")


def report(args, rows: list[dict], stamp: str, argv: list[str]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = RESULTS / f"time-to-accuracy-cpu-{stamp}"
    machine = launch.machine()
    base.with_suffix(".json").write_text(json.dumps(
        {"date": stamp, "args": vars(args), "machine": machine, "rows": rows}, indent=1))
    heads = " | ".join(f"s to {t}% (mean ± std)" for t in args.targets)
    lines = [f"# Time to test error, Fashion-MNIST, {stamp}", "",
             f"Command: `python -m benchmarks.time_to_accuracy {' '.join(argv)}`", "",
             f"ResNet-20 (K=4 for local methods), configs/fmnist_*_cpu.toml, {args.epochs} "
             f"epoch(s) of {args.train_subset or 60000} training images, evaluated on "
             f"{args.test_subset or 10000} test images every {args.eval_every} steps and at "
             f"epoch ends; seeds "
             f"{', '.join(map(str, args.seeds))}; {machine['cpus']} CPU cores shared out "
             f"among the ranks; torch {machine['torch']}; {machine['platform']}.", "",
             f"| configuration | ranks x threads | {heads} | final error % | training s | "
             f"images/s |", "|---|---|" + "---|" * len(args.targets) + "---|---|---|"]
    for label in CONFIGS:
        rs = [r for r in rows if r["configuration"] == label]
        if not rs:
            continue
        times = " | ".join(_mean([r["time_to_target_s"][str(t)] for r in rs])
                           for t in args.targets)
        finals = [r["final_error"] for r in rs]
        lines.append(f"| {label} | {rs[0]['ranks']} x {rs[0]['threads_per_rank']} | {times} | "
                     f"{statistics.fmean(finals):.2f}"
                     + (f" ± {statistics.stdev(finals):.2f}" if len(finals) > 1 else "")
                     + f" | {statistics.fmean(r['train_s'] for r in rs):.0f} | "
                       f"{statistics.fmean(r['images_per_s'] for r in rs):.0f} |")
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(args, rows, base.with_suffix(".png"))
    print("\n".join(lines))
    return base


def plot(args, rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours = dict(zip(CONFIGS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for r in rows:
        first = r["seed"] == min(x["seed"] for x in rows if x["configuration"] == r["configuration"])
        ax.plot([c["train_s"] for c in r["curve"]], [c["error"] for c in r["curve"]],
                marker=".", color=colours[r["configuration"]], alpha=0.85,
                label=f"{r['configuration']} ({r['ranks']} rank{'s' * (r['ranks'] > 1)})"
                if first else None)
    for t in args.targets:
        ax.axhline(t, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("training seconds (evaluation excluded)")
    ax.set_ylabel("test top-1 error %")
    ax.set_ylim(top=min(40, max(c["error"] for r in rows for c in r["curve"]) + 1))
    ax.set_title("Fashion-MNIST, ResNet-20: test error against training time (one line per seed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.time_to_accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="15,12", help="test errors to reach (%%), comma-separated")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-subset", type=int, default=20000, help="0: all 60,000 images")
    p.add_argument("--test-subset", type=int, default=0,
                   help="evaluate on N test images drawn class by class (0: all 10,000)")
    p.add_argument("--eval-every", type=int, default=40, help="steps between evaluations")
    p.add_argument("--ranks", type=int, default=2, help="ranks of DDP and of the pipelines")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help="a comma-separated subset of: " + ", ".join(CONFIGS))
    p.add_argument("--timeout", type=int, default=3 * 3600)
    args = p.parse_args(argv)
    args.targets = [float(t) for t in args.targets.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    chosen = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in CONFIGS]
    if unknown:
        p.error(f"--configs: unknown {unknown}; choose from {list(CONFIGS)}")
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M")
    rows = []
    with tempfile.TemporaryDirectory(prefix="pipemlaan-tta-") as tmp:
        for seed in args.seeds:
            for label in chosen:
                rows.append(run(args, label, seed, Path(tmp)))
                report(args, rows, stamp, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
