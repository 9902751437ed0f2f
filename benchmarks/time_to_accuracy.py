"""Time to accuracy on the same devices: BP in one process against DGL and DGL+MLAAN pipelines.

  python -m benchmarks.time_to_accuracy                      # ~15 min on 2 cores
  python -m benchmarks.time_to_accuracy --target 88 --epochs 8 --train-subset 0 --ranks 4

Every configuration gets the same cores: the single process runs with all of them as torch
threads, a pipeline of N ranks with cpu_count/N threads per rank. All train ResNet-20 (K=4 for
the local methods) on real Fashion-MNIST with the same seed, batch, learning-rate schedule and
epochs, and are evaluated on the whole test set after every epoch. The time counted is training
time (each run's `train_s` in its eval lines: evaluation excluded), the first epoch whose test
accuracy reaches `--target` gives the time to accuracy. Runs are sequential, so each one has the
machine to itself. Results: JSON + Markdown in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
from pathlib import Path

from benchmarks import launch
from pipemlaan.config import method_flags


ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

CONFIGS = {
    "bp, 1 process": ("bp", 1),
    "dgl, pipeline": ("dgl", None),
    "dgl+mlaan, pipeline": ("dgl+mlaan", None),
}


def run(args, name: str, method: str, ranks: int, workdir: Path) -> dict:
    cores = os.cpu_count() or 1
    threads = max(1, cores // ranks)
    tag = name.replace(", ", "-").replace(" ", "_").replace("+", "_")
    flags = ["--data.name=fashion_mnist", f"--model.name={args.model}", f"--model.K={args.K}",
             f"--train.epochs={args.epochs}", f"--train.batch_size={args.batch}",
             f"--train.lr={args.lr}", f"--train.seed={args.seed}",
             f"--train.threads={threads}", f"--run.dir={workdir}", f"--run.name={tag}",
             "--run.overwrite=true", "--run.progress=false", "--run.log_every=50",
             "--pipeline.mode=async", *method_flags(method)]
    if args.train_subset:
        flags.append(f"--data.train_subset={args.train_subset}")
    launch.run(launch.train_command(ranks, flags), launch.run_env(threads), args.timeout)
    lines = [json.loads(x) for x in (workdir / tag / "metrics.jsonl").read_text().splitlines()]
    curve = [{"epoch": r["epoch"], "train_s": r["train_s"],
              "test_accuracy": 100.0 - r["test_top1_error"]}
             for r in lines if r.get("kind") == "eval"]
    reached = next((c for c in curve if c["test_accuracy"] >= args.target), None)
    summary = json.loads((workdir / tag / "summary.json").read_text())
    out = {"configuration": name, "method": method, "ranks": ranks, "threads_per_rank": threads,
           "curve": curve, "final_accuracy": curve[-1]["test_accuracy"],
           "train_s": curve[-1]["train_s"], "images_per_s": summary["images_per_s"],
           "time_to_target_s": reached["train_s"] if reached else None,
           "epochs_to_target": reached["epoch"] if reached else None}
    t = f"{out['time_to_target_s']:.0f} s" if reached else "not reached"
    print(f"{name:<22} ranks {ranks} x {threads} threads: final {out['final_accuracy']:.2f}%, "
          f"{out['train_s']:.0f} s training, {args.target}% after {t}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.time_to_accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", type=float, default=85.0, help="test accuracy to reach (%%)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--train-subset", type=int, default=15000)
    p.add_argument("--ranks", type=int, default=2, help="pipeline ranks (same cores in total)")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--K", type=int, default=4)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=int, default=3 * 3600)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M")
    rows = []
    with tempfile.TemporaryDirectory(prefix="pipemlaan-tta-") as tmp:
        for name, (method, ranks) in CONFIGS.items():
            rows.append(run(args, name, method, ranks or args.ranks, Path(tmp)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = RESULTS / f"time-to-accuracy-cpu-{stamp}"
    machine = launch.machine()
    base.with_suffix(".json").write_text(json.dumps(
        {"date": stamp, "args": vars(args), "machine": machine, "rows": rows}, indent=1))
    head = " | ".join(f"epoch {e + 1}" for e in range(args.epochs))
    lines = [f"# Time to {args.target}% test accuracy, Fashion-MNIST, {stamp}", "",
             f"Command: `python -m benchmarks.time_to_accuracy {' '.join(sys.argv[1:])}`", "",
             f"{args.model} (K={args.K} for local methods), batch {args.batch}, lr {args.lr}, "
             f"{args.epochs} epochs of {args.train_subset or 60000} training images, full test "
             f"set, seed {args.seed}; {machine['cpus']} CPU cores shared out among the "
             f"ranks; torch {machine['torch']}; {machine['platform']}.", "",
             "Test accuracy (%) after each epoch:", "",
             f"| configuration | ranks x threads | {head} | training s | images/s | "
             f"time to {args.target}% |",
             "|---|---|" + "---|" * args.epochs + "---|---|---|"]
    for r in rows:
        accs = " | ".join(f"{c['test_accuracy']:.2f}" for c in r["curve"])
        t = f"{r['time_to_target_s']:.0f} s" if r["time_to_target_s"] else "not reached"
        lines.append(f"| {r['configuration']} | {r['ranks']} x {r['threads_per_rank']} | {accs} | "
                     f"{r['train_s']:.0f} | {r['images_per_s']:.0f} | {t} |")
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
