"""A/B throughput of this tree against an earlier commit, interleaved in one invocation: what a
change costs a step.

  OMP_NUM_THREADS=1 python -m benchmarks.ab --base e386844            # ~12 min on 2 cores
  python -m benchmarks.ab --base HEAD~3 --configs "dgl+mlaan:2" --repeats 5 --name stash

The base commit is checked out in a temporary git worktree; both trees run with this venv
(PYTHONPATH and the working directory set to the tree), in `make bench`'s shapes: ResNet-20
K=4, batch 128, synthetic 1x28x28 images, 40 steps of which the first 10 are left out, async
pipelines with 2 batches in flight, one thread per rank, each tree with its own defaults
otherwise (what a user gets from either). The order alternates every repeat (A B, B A, ...), so
drift of the machine hits both alike. Reported per configuration: median images/s of each side
(the last rank's steady-state windows), min-max, and head / base. Results: Markdown + JSON in
benchmarks/results/ab-cpu-<name>-<date>.*
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import launch
from pipemlaan.config import method_flags

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def one_run(tree: Path, method: str, ranks: int, args, workdir: Path, tag: str) -> float:
    flags = ["--data.name=synthetic", f"--data.synthetic_size={args.batch * (args.steps + 2)}",
             "--data.synthetic_image=[1,28,28]", "--model.name=resnet20",
             f"--model.K={1 if method == 'bp' else 4}", f"--train.batch_size={args.batch}",
             "--train.epochs=1", f"--train.max_steps={args.steps}", "--train.threads=1",
             "--data.test_subset=64", f"--run.dir={workdir}", f"--run.name={tag}",
             "--run.overwrite=true", "--run.progress=false", "--run.log_every=5",
             "--pipeline.mode=async", "--pipeline.in_flight=2", *method_flags(method)]
    cmd = launch.train_command(0 if ranks == 1 else ranks, flags)
    env = launch.run_env(1, PYTHONPATH=str(tree))
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True,
                          timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{tree.name} {method} {ranks}: {proc.stderr[-2000:]}")
    records = [json.loads(x) for x in (workdir / tag / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in records if r.get("kind") == "train" and r["step"] - 5 >= args.warmup]
    last = max(r["rank"] for r in rows)
    return statistics.fmean(r["images_per_s"] for r in rows if r["rank"] == last)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the commit to compare with")
    p.add_argument("--configs", default="dgl+mlaan:1,dgl+mlaan:2,bp:1",
                   help="METHOD:RANKS, comma-separated")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--timeout", type=int, default=600)
    p.add_argument("--name", default="")
    args = p.parse_args(argv)
    configs = [(c.split(":")[0], int(c.split(":")[1])) for c in args.configs.split(",")]
    base = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, text=True,
                          capture_output=True, check=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                          capture_output=True, check=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=ROOT, text=True, capture_output=True).stdout.strip())
    got: dict[tuple, dict[str, list[float]]] = {c: {"base": [], "head": []} for c in configs}
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M")
    log = []
    with tempfile.TemporaryDirectory(prefix="pipemlaan-ab-") as tmp:
        wt = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(wt), base], cwd=ROOT,
                       check=True, capture_output=True)
        try:
            trees = {"base": wt, "head": ROOT}
            for rep in range(args.repeats):
                for i, (method, ranks) in enumerate(configs):
                    order = ("base", "head") if (rep + i) % 2 == 0 else ("head", "base")
                    for side in order:
                        ips = one_run(trees[side], method, ranks, args, Path(tmp),
                                      f"{side}-{rep}-{i}")
                        got[(method, ranks)][side].append(ips)
                        line = (f"{dt.datetime.now():%H:%M:%S} repeat {rep} {method} "
                                f"{ranks} rank(s) {side}: {ips:.1f} img/s")
                        log.append(line)
                        print(line, flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(wt)], cwd=ROOT,
                           capture_output=True)
    lines = [f"# A/B: CPU throughput, head {head}{' (with uncommitted changes)' * dirty} "
             f"against base {base}, {stamp}", "",
             f"Command: `python -m benchmarks.ab {' '.join(argv)}`", "",
             f"ResNet-20, batch {args.batch}, synthetic 1x28x28, {args.steps} steps (the first "
             f"{args.warmup} left out), async with 2 in flight, one thread per rank, "
             f"{args.repeats} interleaved repeats. Machine: {json.dumps(launch.machine())}", "",
             "| configuration | base images/s median (min-max) | head images/s median (min-max) "
             "| head / base |", "|---|---|---|---|"]
    out = {}
    for (method, ranks), sides in got.items():
        b, h = statistics.median(sides["base"]), statistics.median(sides["head"])
        out[f"{method} {ranks}"] = {"base": sides["base"], "head": sides["head"],
                                    "ratio": h / b}
        lines.append(f"| {method}, {ranks} rank(s) | {b:.1f} ({min(sides['base']):.1f}-"
                     f"{max(sides['base']):.1f}) | {h:.1f} ({min(sides['head']):.1f}-"
                     f"{max(sides['head']):.1f}) | {h / b:.3f}x |")
    lines += ["", "```", *log, "```"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"ab-cpu-{args.name + '-' if args.name else ''}{stamp}"
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    path.with_suffix(".json").write_text(json.dumps(
        {"base": base, "head": head, "dirty": dirty, "args": vars(args), "results": out},
        indent=1))
    print("\n".join(lines[:10 + len(got)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
