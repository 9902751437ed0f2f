"""The method study on real Fashion-MNIST that decides the defaults: BP, DGL, InfoPro, and
DGL+MLAAN and InfoPro+MLAAN each under the reference MLM plan ("NAME:ref": the modules before
the first window have no head of their own) and with every module headed ("NAME:headed").

  python -m benchmarks.study --jobs 2 --workdir W --resume   # 3 seeds x 3 epochs (hours on 2 cores)
  python -m benchmarks.study --workdir W --report-only       # report what W holds, train nothing
  python -m benchmarks.study --quick                        # one seed, 20k images, 1 epoch
  python -m benchmarks.study --methods dgl,dgl+mlm,dgl+lam,dgl+mlaan   # the paper's ablation
  python -m benchmarks.study --epochs 1 --jobs 2 --staleness-check --async-check
  python -m benchmarks.study --model vit_micro --methods bp,dgl,dgl+mlaan:headed --lr 0.05 \
      --set train.warmup_epochs=0.3 --seeds 0,1 --train-subset 20000   # a ViT (docs/results.md#vit)

Every run is a real `python -m pipemlaan.train` (single process unless --ranks > 1), same
backbone (ResNet-20 unless --model), same K, same epochs and seeds for every method, and names
its MLM plan explicitly (so a later change of the defaults does not change a finished run).
Results, as JSON + Markdown in benchmarks/results/: test top-1 error, mean ± standard deviation
over seeds, every seed, the difference to BP, the error after each epoch, wall time, images/s
and per-rank memory; and a plot of the error by epoch (mean ± std: does a gap close with
training?) beside every module head's test accuracy (the paper's Figure 5 shape). `--resume`
with `--workdir` keeps finished runs of the same configuration, so a study cut short goes on
where it stopped. `--async-check` also trains dgl+mlaan as a 4-rank async pipeline;
`--staleness-check` trains it in one process that emulates that pipeline exactly
(pipeline.emulate_async). `--jobs J` runs J single-process runs at once with cpu_count/J threads
each (runs are independent, so this only changes wall time and images/s, which are then per-run
figures under shared cores).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks import launch
from pipemlaan.config import load_config, method_flags
from pipemlaan.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
# the defaults study: each MLAAN variant under either MLM plan (see PLANS)
STUDY = ("bp", "dgl", "infopro", "dgl+mlaan:ref", "dgl+mlaan:headed", "infopro+mlaan:ref",
         "infopro+mlaan:headed")
RESULTS = ROOT / "benchmarks" / "results"

# The MLM plan of an MLAAN variant: "dgl+mlaan:ref" (the modules before the first window have no
# head, the reference code's plan) or "dgl+mlaan:headed" (every module has one). Every run names
# its plan explicitly, so a later change of the library's default does not change the runs.
PLANS = {"ref": "false", "headed": "true"}


def plan_flags(variant: str) -> tuple[str, list[str]]:
    """'dgl+mlaan:headed' -> ('dgl+mlaan', [its flags]); a bare label takes the reference plan."""
    label, _, plan = variant.partition(":")
    if plan and plan not in PLANS:
        raise ValueError(f"unknown plan {plan!r} in {variant!r}: use {' or '.join(PLANS)}")
    return label, [*method_flags(label),
                   f"--method.first_modules_head={PLANS[plan or 'ref']}"]


def run(args, method: str, seed: int, ranks: int, workdir: Path, extra: tuple = (),
        tag: str = "") -> dict:
    name = (f"{method.replace(':', '-')}-s{seed}-r{ranks}"
            + (f"-mb{args.microbatches}" if ranks > 1 else "") + tag)
    flags = [f"--model.name={args.model}", f"--model.K={args.K}", "--data.name=fashion_mnist",
             f"--train.epochs={args.epochs}", f"--train.batch_size={args.batch}",
             f"--train.lr={args.lr}", f"--train.seed={seed}", f"--run.dir={workdir}",
             f"--run.name={name}", "--run.progress=false", "--run.log_every=50",
             "--run.overwrite=true", *plan_flags(method)[1],
             *(f"--{kv}" for kv in args.set), *extra]
    if args.train_subset:
        flags.append(f"--data.train_subset={args.train_subset}")
    threads = 1
    if ranks > 1:
        flags += ["--train.threads=1", "--pipeline.mode=async",
                  f"--pipeline.in_flight={args.microbatches}"]
    elif args.jobs > 1:
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        flags.append(f"--train.threads={threads}")
    else:       # one run at a time: the threads this study was started with
        threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    cmd = launch.train_command(ranks, flags)
    env = launch.run_env(threads)
    if args.resume and _finished(workdir / name, flags):
        s = json.loads((workdir / name / "summary.json").read_text())
        print(f"{method:<14} seed {seed} ranks {ranks}: kept from {workdir / name}", flush=True)
        return {**s, "curve": _curve(workdir / name), "seed": seed}
    if args.report_only:
        return None
    launch.run(cmd, env, args.timeout)
    s = json.loads((workdir / name / "summary.json").read_text())
    s["curve"], s["seed"] = _curve(workdir / name), seed
    print(f"{method:<14} seed {seed} ranks {ranks}: top-1 error {s['test_top1_error']:.2f}% "
          f"({s['wall_s']:.0f} s, {s['images_per_s']:.0f} img/s)", flush=True)
    return s


def _curve(run_dir: Path) -> list[float]:
    """The run's test top-1 error after each evaluated epoch, in order."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return [r["test_top1_error"] for r in sorted((r for r in lines if r.get("kind") == "eval"),
                                                  key=lambda r: r["step"])]


def _finished(run_dir: Path, flags: list[str]) -> bool:
    """Whether run_dir holds a finished run of exactly the config these flags resolve to."""
    if not (run_dir / "summary.json").is_file() or not (run_dir / "config.toml").is_file():
        return False
    # through load_config, so keys added to pipemlaan since that run take their defaults
    try:
        had = load_config(run_dir / "config.toml").to_dict()
    except ConfigError:
        return False
    wanted = load_config(None, flags).to_dict()
    # the threads a run had (set by --jobs) change its speed, not what it is
    for cfg in (had, wanted):
        cfg.get("train", {}).pop("threads", None)
    return all(had.get(k) == v for k, v in wanted.items() if k != "run")


# the settings that make two studies' runs of one method and seed the same experiment
SAME_STUDY = ("model", "K", "epochs", "batch", "lr", "train_subset", "ranks", "set")


def earlier_runs(path: Path, args) -> dict[str, list[dict]]:
    """The runs of an earlier study's JSON, by method, refused unless it ran the same settings
    (so a table never mixes seeds of two different experiments)."""
    old = json.loads(path.read_text())
    had = {k: old["args"].get(k, [] if k == "set" else None) for k in SAME_STUDY}
    wanted = {k: getattr(args, k) for k in SAME_STUDY}
    if had != wanted:
        diff = ", ".join(f"{k}: {had[k]!r} there, {wanted[k]!r} here"
                         for k in SAME_STUDY if had[k] != wanted[k])
        raise SystemExit(f"--with-runs {path}: that study ran other settings ({diff}); "
                         "run this one with its settings")
    return old["runs"]


def merged(runs: list[dict], earlier: list[dict]) -> list[dict]:
    """This study's runs plus the earlier study's runs of seeds this one did not run, by seed."""
    have = {r["seed"] for r in runs}
    return sorted(runs + [r for r in earlier if r["seed"] not in have], key=lambda r: r["seed"])


def _std(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def aggregate(runs: list[dict]) -> dict:
    errs = [r["test_top1_error"] for r in runs]
    # null where a module has no head of its own (the first modules of an MLM plan)
    per_module = [None if None in m else statistics.fmean(m)
                  for m in zip(*(r["per_module_test_error"] for r in runs))]
    epochs = list(zip(*(r["curve"] for r in runs)))       # epoch -> the seeds' errors
    return {"top1_error_mean": statistics.fmean(errs), "top1_error_std": _std(errs),
            "top1_error_spread": (max(errs) - min(errs)) / 2 if len(errs) > 1 else 0.0,
            "top1_errors": errs, "seeds": [r["seed"] for r in runs],
            "curve_mean": [statistics.fmean(e) for e in epochs],
            "curve_std": [_std(list(e)) for e in epochs],
            "wall_s_mean": statistics.fmean(r["wall_s"] for r in runs),
            "images_per_s_mean": statistics.fmean(r["images_per_s"] for r in runs),
            "peak_memory_bytes": runs[0]["peak_memory_bytes"],
            "per_module_test_error": per_module}


def plot(results: dict, path: Path, K: int) -> None:
    """Left: test error after each epoch (mean over seeds, one standard deviation shaded), so
    the reader sees whether a gap closes with training. Right: every module head's test
    accuracy (the paper's Figure 5 shape)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (curves, layers) = plt.subplots(1, 2, figsize=(10, 3.8))
    color = {m: f"C{i}" for i, m in enumerate(results)}      # one colour per method, both panels
    for method, r in results.items():
        mean, std = r["curve_mean"], r["curve_std"]
        if not mean:
            continue
        x = range(1, len(mean) + 1)
        curves.plot(x, mean, marker="o", label=method, color=color[method],
                    ls=":" if method == "bp" else "-")
        curves.fill_between(x, [m - s for m, s in zip(mean, std)],
                            [m + s for m, s in zip(mean, std)], alpha=0.15, color=color[method])
        curves.set_xticks(list(x))
    curves.set_xlabel("epoch")
    curves.set_ylabel("test top-1 error (%)")
    curves.set_title("Test error by epoch (mean ± std over seeds)")
    curves.legend(fontsize=7)
    for method, r in results.items():
        if method != "bp" and ("mlaan" in method or method == "dgl"):
            shown = [(k + 1, 100 - e) for k, e in enumerate(r["per_module_test_error"])
                     if e is not None]
            layers.plot(*zip(*shown), marker="o", label=method, color=color[method])
    if "bp" in results:
        layers.axhline(100 - results["bp"]["top1_error_mean"], ls=":", color=color["bp"],
                       label="bp")
    layers.set_xlabel("local module")
    layers.set_ylabel("test accuracy of its head (%)")
    layers.set_xticks(range(1, K + 1))
    layers.set_title("Layer-wise accuracy (last epoch)")
    layers.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plan_decisions(results: dict) -> list[str]:
    """The defaults rule, applied to each MLAAN variant studied under both plans: the plan with
    the lower mean error wins, unless the means are within one standard deviation (the larger
    of the two plans'), where the reference plan stays."""
    out = []
    for label in sorted({m.partition(":")[0] for m in results if ":" in m}):
        ref, headed = results.get(f"{label}:ref"), results.get(f"{label}:headed")
        if not (ref and headed):
            continue
        diff = headed["top1_error_mean"] - ref["top1_error_mean"]
        std = max(ref["top1_error_std"], headed["top1_error_std"])
        n = min(len(ref["top1_errors"]), len(headed["top1_errors"]))
        if n < 2:
            verdict = "undecided (one seed: no standard deviation)"
        elif abs(diff) <= std:
            verdict = "within one standard deviation: the reference plan stays"
        else:
            verdict = "every module headed wins" if diff < 0 else "the reference plan wins"
        out.append(f"- {label}: headed - ref = {diff:+.2f} points (larger std {std:.2f}, "
                   f"{n} seed{'s' if n > 1 else ''} each): {verdict}.")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, 20k images, 1 epoch")
    p.add_argument("--methods", default=",".join(STUDY))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--K", type=int, default=4)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--train-subset", type=int, default=0)
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="one more pipemlaan.train setting for every run (repeatable), e.g. "
                        "--set train.warmup_epochs=0.5")
    p.add_argument("--async-check", action="store_true",
                   help="also train dgl+mlaan as a 4-rank async pipeline")
    p.add_argument("--staleness-check", action="store_true",
                   help="also train dgl+mlaan in one process emulating the 4-rank async "
                   "pipeline exactly (pipeline.emulate_async: the same weights as the "
                   "pipeline, so the same accuracy, at one process's cost)")
    p.add_argument("--jobs", type=int, default=1,
                   help="single-process runs at once (each gets cpu_count/jobs threads)")
    p.add_argument("--workdir", default="",
                   help="keep every run's directory here (default: a temporary directory)")
    p.add_argument("--resume", action="store_true",
                   help="with --workdir: keep runs already finished there with the same config")
    p.add_argument("--in-flight", dest="microbatches", type=int, default=2,
                   help="batches in flight per rank in the pipelined runs")
    p.add_argument("--timeout", type=int, default=6 * 3600)
    p.add_argument("--with-runs", type=Path, metavar="STUDY.json",
                   help="add the runs of an earlier study's JSON (same settings) for the seeds "
                        "this one does not run: complete a study's seeds in a new workdir")
    p.add_argument("--report-only", action="store_true",
                   help="with --workdir: train nothing, report the runs finished there (a "
                   "method's row counts the seeds it has; a method with none is left out)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.report_only and not args.workdir:
        p.error("--report-only reports the runs of a --workdir: name one")
    args.resume = args.resume or args.report_only
    if args.quick:
        args.seeds, args.epochs, args.train_subset = "0", 1, 20000
    seeds = [int(s) for s in args.seeds.split(",")]
    chosen = args.methods.split(",")
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M")
    results, raw = {}, {}
    earlier = earlier_runs(args.with_runs, args) if args.with_runs else {}

    def keep(label: str, runs: list) -> None:
        """A row for the runs that finished (None: not run, under --report-only)."""
        if runs := merged([r for r in runs if r], earlier.get(label, [])):
            raw[label], results[label] = runs, aggregate(runs)
    with tempfile.TemporaryDirectory(prefix="pipemlaan-study-") as scratch:
        tmp = args.workdir or scratch
        jobs = args.jobs if args.ranks == 1 else 1
        mb = args.microbatches
        emulated = (f"dgl+mlaan, one process emulating 4 async ranks, {mb} in flight",
                    "dgl+mlaan", ("--pipeline.emulate_async=[1,1,1,1]",
                                  f"--pipeline.in_flight={mb}"), f"-emulate4-mb{mb}")
        with cf.ThreadPoolExecutor(max_workers=jobs) as pool:
            # seed by seed: a study cut short still has every method on its first seeds
            futures = {m: [] for m in chosen}
            for s in seeds:
                for m in chosen:
                    futures[m].append(pool.submit(run, args, m, s, args.ranks, Path(tmp)))
            if args.staleness_check:
                label, m, extra, tag = emulated
                futures[label] = [pool.submit(run, args, m, s, 1, Path(tmp), extra, tag)
                                  for s in seeds]
            for method in futures:
                keep(method, [f.result() for f in futures[method]])
        if args.async_check:
            keep(f"dgl+mlaan async 4 ranks, {args.microbatches} in flight",
                 [run(args, "dgl+mlaan", s, 4, Path(tmp)) for s in seeds])
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = RESULTS / ("study-fmnist-" + ("" if args.model == "resnet20" else f"{args.model}-")
                      + stamp)
    base.with_suffix(".json").write_text(json.dumps(
        {"date": stamp, "args": {**vars(args), "with_runs": str(args.with_runs or "")},
         "results": results, "runs": raw}, indent=1))
    lines = [f"# Fashion-MNIST method study, {stamp}", "",
             f"Command: `python -m benchmarks.study {' '.join(sys.argv[1:])}`", "",
             f"{args.model}, K={args.K}, {args.epochs} epoch(s), batch {args.batch}, lr "
             f"{args.lr}, seeds {seeds}, train subset {args.train_subset or 'all 60000'}, "
             f"test set 10000, {args.ranks} rank(s), {args.jobs} run(s) at once on "
             f"{os.cpu_count()} CPU cores"
             + (f", settings {', '.join(args.set)}" if args.set else "")
             + (f"; seeds not run here are from {args.with_runs.name}" if args.with_runs else "")
             + ".", "",
             "| method | test top-1 error, mean ± std | vs BP | seeds | every seed | by epoch "
             "(mean) | wall s | images/s | peak memory per rank (MiB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    bp = results.get("bp")
    for m, r in results.items():
        mem = ", ".join(f"{b / 2**20:.0f}" for b in r["peak_memory_bytes"])
        vs = f"{r['top1_error_mean'] - bp['top1_error_mean']:+.2f}" if bp else ""
        seeds_ = ", ".join(f"s{k} {e:.2f}" for k, e in zip(r["seeds"], r["top1_errors"]))
        curve = " → ".join(f"{e:.2f}" for e in r["curve_mean"])
        lines.append(f"| {m} | {r['top1_error_mean']:.2f} ± {r['top1_error_std']:.2f} | {vs} | "
                     f"{len(r['top1_errors'])} | {seeds_} | {curve} | {r['wall_s_mean']:.0f} | "
                     f"{r['images_per_s_mean']:.0f} | {mem} |")
    lines += ["", *plan_decisions(results)]
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(results, base.with_suffix(".png"), args.K)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
