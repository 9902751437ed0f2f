"""What the async pipeline's staleness costs, and what removes it (issue 30): one-process runs
paired by seed on real Fashion-MNIST, the single process against its exact emulation of the
4-rank async pipeline (pipeline.emulate_async, docs/method.md#async-staleness) and variants.

  python -m benchmarks.staleness --jobs 2 --workdir W             # the table (hours on 2 cores)
  python -m benchmarks.staleness --workdir W --report-only        # report what W holds
  python -m benchmarks.staleness --variants single,async --seeds 0 # one pair

Every run is `python -m pipemlaan.train --config configs/fmnist_mlaan_cpu.toml` (ResNet-20 K=4,
DGL+MLAAN, every module headed, one epoch, batch 128, lr 0.1) on `--subset` training images,
with ONE thread: a lockstep pipeline equals the single process bit for bit at one thread per
rank, and the emulation equals the real async pipeline bit for bit (tests/test_inprocess.py),
so the paired difference is staleness and nothing else (two threads against one change the
summation order, and these short runs amplify such rounding by up to a point). Reported per
variant: test top-1 error for every seed, mean ± std, and the paired difference to the single
process of the same plan (mean ± std over seeds), as JSON + Markdown in benchmarks/results/.
A run whose summary.json is in the workdir is not run again (a table cut short goes on).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import json
import statistics
import sys
from pathlib import Path

from benchmarks import launch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CONFIG = "configs/fmnist_mlaan_cpu.toml"
EMULATE = ["--pipeline.emulate_async=[1,1,1,1]", "--pipeline.in_flight=2"]
REF_PLAN = ["--method.first_modules_head=false"]
PLAIN = ["--pipeline.local_first=false", "--pipeline.predict_weights=false",
         "--pipeline.stale_lr=1", "--pipeline.stale_momentum=-1"]

# variant -> (what it is, the single-process variant it is paired with, its flags). Every flag
# that the comparison depends on is named, so a later change of a default changes no run.
VARIANTS: dict[str, tuple[str, str, list[str]]] = {
    "single": ("single process (= lockstep pipeline)", "single", [*PLAIN]),
    "async": ("4-rank async, 2 in flight (emulated), plain steps", "single",
              [*EMULATE, *PLAIN]),
    "window": ("window-gradient delay alone", "single",
               [*EMULATE, "--pipeline.emulate_delay=window", *PLAIN]),
    "lam": ("LAM-snapshot delay alone", "single",
            [*EMULATE, "--pipeline.emulate_delay=lam", *PLAIN]),
    "predict": ("async + weight prediction", "single",
                [*EMULATE, *PLAIN, "--pipeline.predict_weights=true"]),
    "local_first": ("async + local first", "single",
                    [*EMULATE, *PLAIN, "--pipeline.local_first=true"]),
    "stale_lr_0.5": ("async, late bodies at half the learning rate", "single",
                     [*EMULATE, *PLAIN, "--pipeline.stale_lr=0.5"]),
    "stale_mom_0.5": ("async, late bodies at momentum 0.5", "single",
                      [*EMULATE, *PLAIN, "--pipeline.stale_momentum=0.5"]),
    "stale_m0.95_lr0.5": ("async, late bodies at momentum 0.95 and half the learning rate "
                          "(the same lr / (1 - momentum))", "single",
                          [*EMULATE, *PLAIN, "--pipeline.stale_momentum=0.95",
                           "--pipeline.stale_lr=0.5"]),
    "single:ref": ("single process, reference plan", "single:ref",
                   [*REF_PLAN, *PLAIN]),
    "async:ref": ("4-rank async emulated, reference plan", "single:ref",
                  [*REF_PLAN, *EMULATE, *PLAIN]),
}


def run_name(variant: str, seed: int) -> str:
    return f"{variant.replace(':', '-')}-s{seed}"


def train(args, variant: str, seed: int) -> dict | None:
    """One run (skipped when its summary is there); returns its summary, None if it failed."""
    name = run_name(variant, seed)
    summary = args.workdir / name / "summary.json"
    if not summary.is_file():
        flags = ["--config", CONFIG, f"--data.train_subset={args.subset}",
                 f"--train.epochs={args.epochs}", f"--train.seed={seed}", "--train.threads=1",
                 f"--run.dir={args.workdir}", f"--run.name={name}", "--run.overwrite=true",
                 "--run.progress=false", *VARIANTS[variant][2]]
        try:
            launch.run(launch.train_command(1, flags), launch.run_env(1), args.timeout)
        except RuntimeError as e:
            print(f"{name}: FAILED {str(e).splitlines()[-1] if str(e) else ''}")
            return None
    return json.loads(summary.read_text())


def stats(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "n": len(xs)}


def report(args, variants: list[str], seeds: list[int]) -> dict:
    rows = {}
    for v in variants:
        errs = {}
        for s in seeds:
            f = args.workdir / run_name(v, s) / "summary.json"
            if f.is_file():
                sm = json.loads(f.read_text())
                errs[s] = {"test_error": sm["test_top1_error"],
                           "per_module": sm.get("per_module_test_error")}
        base = VARIANTS[v][1]
        gaps = []
        for s, e in errs.items():
            f = args.workdir / run_name(base, s) / "summary.json"
            if f.is_file():
                gaps.append(e["test_error"] - json.loads(f.read_text())["test_top1_error"])
        rows[v] = {"what": VARIANTS[v][0], "paired_with": base, "flags": VARIANTS[v][2],
                   "seeds": errs,
                   "test_error": stats([e["test_error"] for e in errs.values()]) if errs else None,
                   "gap": stats(gaps) if gaps and v != base else None}
    return rows


def write(args, rows: dict) -> Path:
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M")
    base = RESULTS / f"async-staleness-fmnist-{stamp}"
    cmd = " ".join(["python -m benchmarks.staleness", *sys.argv[1:]])
    out = {"command": cmd, "config": CONFIG, "subset": args.subset, "epochs": args.epochs,
           "machine": launch.machine(), "rows": rows}
    base.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [f"# Async staleness on real Fashion-MNIST, {stamp}", "",
             f"Command: `{cmd}`", "",
             f"`{CONFIG}` (ResNet-20 K=4, DGL+MLAAN, batch 128, lr 0.1) on {args.subset} training "
             f"images, {args.epochs} epoch(s), one process with one thread per run; the gap is "
             "paired by seed against the single process of the same plan.", "",
             "| variant | test top-1 error (mean ± std) | gap to single (mean ± std) | "
             "per seed | per-module error, first seed |", "|---|---|---|---|---|"]
    for v, r in rows.items():
        if not r["test_error"]:
            continue
        te, gap = r["test_error"], r["gap"]
        seeds = ", ".join(f"s{s} {e['test_error']:.2f}" for s, e in sorted(r["seeds"].items()))
        first = next(iter(sorted(r["seeds"].items())))[1]["per_module"] or []
        mods = " / ".join("-" if x is None else f"{x:.1f}" for x in first)
        lines.append(f"| {r['what']} (`{v}`) | {te['mean']:.2f} ± {te['std']:.2f} (n={te['n']}) | "
                     + (f"{gap['mean']:+.2f} ± {gap['std']:.2f} (n={gap['n']})" if gap else "-")
                     + f" | {seeds} | {mods} |")
    lines += ["", "Flags per variant (beside the common ones): "
              + "; ".join(f"`{v}`: `{' '.join(VARIANTS[v][2])}`" for v in rows), "",
              f"Machine: {json.dumps(out['machine'])}", ""]
    base.with_suffix(".md").write_text("\n".join(lines))
    return base


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--subset", type=int, default=20000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--jobs", type=int, default=1, help="runs at once (one thread each)")
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "staleness")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--timeout", type=int, default=7200)
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}: use {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    # every variant's single-process partner runs too
    variants += [b for b in dict.fromkeys(VARIANTS[v][1] for v in variants) if b not in variants]
    if not args.report_only:
        launch.end_all_on_signal()
        with cf.ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda vs: train(args, *vs), [(v, s) for s in seeds for v in variants]))
    base = write(args, report(args, variants, seeds))
    print(f"wrote {base}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
