"""Throughput benchmark: single process vs pipemlaan pipelines vs BP (alone and pipelined by
torch.distributed.pipelining), measured side by side in one invocation.

  make bench                       # the CPU set (2 ranks, one thread each; < 15 min on 2 cores)
  python -m benchmarks.throughput --ranks 1,2 --repeats 3 --steps 40
  python -m benchmarks.throughput --device cuda --ranks 1,2,4 --batch 256 --image 3,32,32 \
      --model resnet110 --K 55 --steps 100     # the GPU variant (one GPU per rank)

Every configuration is run `--repeats` times, interleaved (A B C A B C ...) so slow drift of the
machine hits all of them alike. Only steady state counts: the first `--warmup` steps (start-up,
pipeline fill, torch.compile's compilation) are excluded, using the per-window images/s every
rank writes to metrics.jsonl. Reported: median images/s and spread (min-max) per configuration,
speed-up over the single-process run of the same method, per rank the compute / receive-wait /
send split, and each run's wall seconds (start-up and compilation included).
Results: JSON + Markdown in benchmarks/results/ and a PNG plot of the scaling curve. The JSON and
Markdown are rewritten after every run, and a configuration that fails or passes `--timeout`
is reported as failed while the others go on, so a benchmark cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from benchmarks import launch
from pipemlaan.config import method_flags


ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("PIPEMLAAN_RESULTS", ROOT / "benchmarks" / "results"))
def pipemlaan_run(args, method: str, ranks: int, workdir: Path, tag: str,
                  extra: tuple[str, ...] = ()) -> dict:
    """One pipemlaan run; returns steady-state figures read from its metrics.jsonl."""
    steps = args.steps
    c, h, w = args.image
    common = [
        "--data.name=synthetic", f"--data.synthetic_size={args.batch * (steps + 2)}",
        f"--data.synthetic_image=[{c},{h},{w}]", f"--model.name={args.model}",
        f"--model.K={args.K}", f"--train.batch_size={args.batch}", "--train.epochs=1",
        f"--train.max_steps={steps}", f"--train.device={args.device}",
        f"--run.dir={workdir}", f"--run.name={tag}", "--run.overwrite=true",
        "--run.progress=false", f"--run.log_every={args.log_every}",
        "--pipeline.mode=async", f"--pipeline.in_flight={args.microbatches}",
        "--train.threads=1" if args.device == "cpu" else "--train.threads=0",
        *method_flags(method), *extra]
    # ranks 0: the single process, no torchrun, no process group
    cmd = launch.train_command(ranks, common)
    t0 = time.perf_counter()
    proc = launch.run(cmd, launch.run_env(1), args.timeout)
    run_s = time.perf_counter() - t0
    # engine/compiled.py's one line when a run asked for compilation and went on eagerly
    eager = next((line.strip() for line in proc.stdout.splitlines()
                  if "torch.compile failed" in line or "train.compile=" in line), None)
    records = [json.loads(line) for line in (workdir / tag / "metrics.jsonl").read_text()
               .splitlines() if line.strip()]
    steady = [r for r in records if r.get("kind") == "train" and r["step"] > args.warmup
              and r["step"] - args.log_every >= args.warmup]
    by_rank: dict[int, list[dict]] = {}
    for r in steady:
        by_rank.setdefault(r["rank"], []).append(r)
    last = max(by_rank)
    # the pipeline moves at one pace; its last rank's images/s is what comes out of it
    ips = statistics.fmean(r["images_per_s"] for r in by_rank[last])
    split = {rk: {k: statistics.fmean(r[k] for r in rs)
                  for k in ("compute_frac", "recv_wait_frac", "send_wait_frac")}
             for rk, rs in sorted(by_rank.items())}
    summary = json.loads((workdir / tag / "summary.json").read_text())
    return {"images_per_s": ips, "per_rank": split, "run_s": run_s,
            "peak_memory_bytes": summary["peak_memory_bytes"],
            "partition": summary["partition"], "cuda_graph": summary.get("cuda_graph"),
            "compile": summary.get("compile") or ({"off": eager} if eager else None)}


def pipelining_run(args, schedule: str, ranks: int, workdir: Path, tag: str) -> dict:
    out = workdir / f"{tag}.json"
    c, h, w = args.image
    cmd = launch.train_command(ranks, [
        "--model", args.model, "--schedule", schedule, "--batch", str(args.batch),
        "--microbatches", str(args.bp_microbatches), "--image", f"{c},{h},{w}",
        "--classes", "10", "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--out", str(out)], program=[str(ROOT / "benchmarks" / "pipelining_bp.py")])
    t0 = time.perf_counter()
    launch.run(cmd, launch.run_env(1), args.timeout)
    res = json.loads(out.read_text())
    return {"images_per_s": res["images_per_s"], "per_rank": {}, "split": res.get("split"),
            "run_s": time.perf_counter() - t0}


def configurations(args) -> list[tuple[str, callable]]:
    """(label, runner) pairs, in the order each repeat runs them."""
    confs = []
    for variant, extra in args.variants:
        for method in args.methods:
            for n in args.ranks:
                if method == "bp" and n > 1:
                    continue
                if method not in args.variant_methods.get(variant, [method]):
                    continue
                label = f"{method} single" if n == 1 else f"{method} {n} ranks"
                label += f" [{variant}]" if variant else ""
                ranks = 0 if n == 1 else n
                confs.append((label, lambda wd, tag, m=method, r=ranks, x=extra:
                              pipemlaan_run(args, m, r, wd, tag, x)))
    if "bp" in args.methods:
        for n in args.ranks:
            if n < 2:
                continue
            for sched in ("gpipe", "1f1b"):
                label = f"bp torch.pipelining {sched} {n} ranks"
                confs.append((label, lambda wd, tag, s=sched, r=n:
                              pipelining_run(args, s, r, wd, tag)))
    return confs


def summarise(results: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for label, runs in results.items():
        if not runs:            # failed, or not reached yet
            continue
        ips = [r["images_per_s"] for r in runs]
        out[label] = {"median": statistics.median(ips), "min": min(ips), "max": max(ips),
                      "runs": ips, "per_rank": runs[-1].get("per_rank", {}),
                      "peak_memory_bytes": runs[-1].get("peak_memory_bytes"),
                      "partition": runs[-1].get("partition"),
                      "cuda_graph": runs[-1].get("cuda_graph"),
                      "compile": runs[-1].get("compile"),
                      "run_s": [r.get("run_s") for r in runs]}
    for label, s in out.items():
        method, variant = label.split(" ")[0], _variant(label)
        base = out.get(f"{method} single{variant}")
        s["speedup_vs_single"] = s["median"] / base["median"] if base else None
        bp = out.get(f"bp single{variant}")
        s["ratio_vs_bp"] = s["median"] / bp["median"] if bp and "ranks" not in label else None
    bp_pipe = {label: s for label, s in out.items() if "1f1b" in label}
    for label, s in out.items():
        n = label.split(" ")[-2] if label.endswith("ranks") else None
        ref = next((v for k, v in bp_pipe.items() if n and k.endswith(f"{n} ranks")), None)
        s["ratio_vs_1f1b_bp"] = s["median"] / ref["median"] if ref and "torch" not in label \
            else None
    return out


def _variant(label: str) -> str:
    """' [NAME]' at the end of a label run under a variant, else ''."""
    return label[label.rindex(" ["):] if label.endswith("]") else ""


def write_outputs(args, summary: dict, stamp: str, failed: dict | None = None,
                  complete: bool = True) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = RESULTS / f"throughput-{args.device}-{args.name + '-' if args.name else ''}{stamp}"
    payload = {"date": stamp, "args": {k: v for k, v in vars(args).items()},
               "versions": launch.machine(), "complete": complete, "failed": failed or {},
               "results": summary}
    base.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    lines = [f"# Throughput, {args.device.upper()}, {stamp}", "",
             f"Command: `python -m benchmarks.throughput {' '.join(args.argv)}`", "",
             f"Model {args.model}, K={args.K}, batch {args.batch}, image {args.image}, "
             f"{args.steps} steps of which the first {args.warmup} are excluded, "
             f"{args.repeats} interleaved repeats, async pipeline with "
             f"{args.microbatches} batches in flight, one thread per rank.", "",
             *([f"Variants (train overrides each method ran under): "
                + "; ".join(f"[{v}] `{' '.join(x) or 'defaults'}`" for v, x in args.variants),
                ""] if args.variants[0][0] else []),
             f"Machine: {json.dumps(launch.machine())}", "",
             *([] if complete else ["**Incomplete**: written while the benchmark ran.", ""]),
             "| configuration | images/s median | min-max | vs single process | vs BP | "
             "vs torch.pipelining 1F1B BP | peak memory (MiB, per rank) | "
             "per rank compute / recv wait / send wait | run s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, s in summary.items():
        split = "; ".join(f"r{r}: {v['compute_frac']:.0%} / {v['recv_wait_frac']:.0%} / "
                          f"{v['send_wait_frac']:.0%}" for r, v in s["per_rank"].items())
        sp = f"{s['speedup_vs_single']:.2f}x" if s["speedup_vs_single"] else "-"
        bp = f"{s['ratio_vs_1f1b_bp']:.2f}x" if s["ratio_vs_1f1b_bp"] else "-"
        vs_bp = f"{s['ratio_vs_bp']:.3f}x" if s.get("ratio_vs_bp") else "-"
        mem = " / ".join(f"{b / 2**20:.0f}" for b in s.get("peak_memory_bytes") or []) or "-"
        run_s = " / ".join(f"{t:.0f}" for t in s.get("run_s") or [] if t is not None)
        lines.append(f"| {label} | {s['median']:.1f} | {s['min']:.1f}-{s['max']:.1f} | {sp} | "
                     f"{vs_bp} | {bp} | {mem} | {split or '-'} | {run_s or '-'} |")
    for label, why in (failed or {}).items():
        last = ([line for line in why.splitlines() if line.strip()] or [""])[-1].strip()
        lines.append(f"| {label} | failed: {last[:200]} | | | | | | | |")
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if complete and summary:
        plot(summary, args, base.with_suffix(".png"))
    return base


def plot(summary: dict, args, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in args.methods:
        xs, ys, lo, hi = [], [], [], []
        for n in args.ranks:
            label = f"{method} single" if n == 1 else f"{method} {n} ranks"
            if label in summary:
                s = summary[label]
                xs.append(n)
                ys.append(s["median"])
                lo.append(s["median"] - s["min"])
                hi.append(s["max"] - s["median"])
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=f"pipemlaan {method}")
            if len(xs) > 1:
                ax.plot(xs, [ys[0] * x for x in xs], ls=":", color="grey")
    for sched in ("gpipe", "1f1b"):
        pts = [(n, summary[f"bp torch.pipelining {sched} {n} ranks"]["median"])
               for n in args.ranks if f"bp torch.pipelining {sched} {n} ranks" in summary]
        if pts:
            ax.plot(*zip(*pts), marker="s", ls="--", label=f"BP torch.pipelining {sched}")
    ax.set_xlabel("ranks (1 = single process)")
    ax.set_ylabel("images/s (steady state)")
    ax.set_xticks(args.ranks)
    ax.set_title(f"{args.model} K={args.K}, batch {args.batch} ({args.device}); dotted: ideal")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--K", type=int, default=4)
    p.add_argument("--methods", default="dgl+mlaan,dgl,bp")
    p.add_argument("--ranks", default="1,2", help="1 = the single process")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--image", default="1,28,28", help="C,H,W (Fashion-MNIST shapes by default)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--microbatches", type=int, default=2)
    p.add_argument("--bp-microbatches", type=int, default=4)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--timeout", type=int, default=600)
    p.add_argument("--variants", default="",
                   help='run every configuration under each set of train overrides, e.g. '
                        '"bf16=;fp32=--train.bf16=false" (NAME=FLAGS separated by ";", flags by '
                        'spaces); labels get " [NAME]". NAME:METHOD,METHOD=FLAGS runs that '
                        'variant for those methods only, e.g. '
                        '"bf16=;compiled:dgl+mlaan=--train.compile=on"')
    p.add_argument("--name", default="", help="goes into the output file names")
    args = p.parse_args(argv)
    args.argv = argv
    args.methods = args.methods.split(",")
    args.ranks = [int(x) for x in args.ranks.split(",")]
    variants = [(v.partition("=")[0].strip(), tuple(v.partition("=")[2].split()))
                for v in args.variants.split(";") if v.strip()] or [("", ())]
    args.variants = [(name.partition(":")[0], flags) for name, flags in variants]
    args.variant_methods = {name.partition(":")[0]: name.partition(":")[2].split(",")
                            for name, _ in variants if ":" in name}
    for name, only in args.variant_methods.items():
        if not set(only) <= set(args.methods):
            p.error(f"--variants {name}: methods {only} are not all in --methods")
    args.image = tuple(int(x) for x in args.image.split(","))
    if args.warmup % args.log_every:
        p.error("--warmup must be a multiple of --log-every")

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    console = Console()
    launch.end_all_on_signal()      # `timeout` around this: end the runs too
    confs = configurations(args)
    results: dict[str, list[dict]] = {label: [] for label, _ in confs}
    failed: dict[str, str] = {}
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M")
    with tempfile.TemporaryDirectory(prefix="pipemlaan-bench-") as tmp:
        for rep in range(args.repeats):
            for i, (label, runner) in enumerate(confs):
                if label in failed:
                    continue
                try:
                    res = runner(Path(tmp), f"r{rep}c{i}")
                except (RuntimeError, OSError, KeyError, ValueError) as e:
                    failed[label] = str(e)
                    lines = [line for line in str(e).splitlines() if line.strip()] or [""]
                    console.print(f"repeat {rep + 1}/{args.repeats}  {label:<36} FAILED: "
                                  f"{lines[-1].strip()[:300]}", soft_wrap=True,
                                  highlight=False, markup=False)
                    continue
                results[label].append(res)
                graph = res.get("cuda_graph") or {}
                # markup off: a variant's "[NAME]" is part of the label, not a style
                console.print(f"repeat {rep + 1}/{args.repeats}  {label:<36} "
                              f"{res['images_per_s']:8.1f} images/s  ({res['run_s']:.0f} s)"
                              + (f"  (CUDA graph: {graph['replayed_steps']} steps replayed)"
                                 if graph.get("replayed_steps") else "")
                              + (f"  (eager: {res['compile']['off']})"
                                 if (res.get("compile") or {}).get("off") else ""),
                              soft_wrap=True, markup=False, highlight=False)
                write_outputs(args, summarise(results), stamp, failed, complete=False)
    summary = summarise(results)
    if not summary:
        console.print("every configuration failed")
        write_outputs(args, summary, stamp, failed)
        return 1
    table = Table(title=f"Steady-state throughput, {args.model} K={args.K}, batch {args.batch}")
    for col in ("configuration", "median img/s", "min-max", "vs single", "vs BP",
                "vs 1F1B BP", "recv wait per rank"):
        table.add_column(col, justify="right")
    for label, s in summary.items():
        table.add_row(escape(label), f"{s['median']:.1f}", f"{s['min']:.0f}-{s['max']:.0f}",
                      f"{s['speedup_vs_single']:.2f}x" if s["speedup_vs_single"] else "-",
                      f"{s['ratio_vs_bp']:.3f}x" if s["ratio_vs_bp"] else "-",
                      f"{s['ratio_vs_1f1b_bp']:.2f}x" if s["ratio_vs_1f1b_bp"] else "-",
                      " ".join(f"{v['recv_wait_frac']:.0%}" for v in s["per_rank"].values())
                      or "-")
    console.print(table)
    base = write_outputs(args, summary, stamp, failed)
    console.print(f"wrote {base}.json, .md and .png")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
