"""Throughput benchmark: pipemlaan's pipelines against the baselines a user would pick, at the
same settings, measured side by side in one invocation.

  make bench                       # the CPU set (2 ranks, one thread each; < 15 min on 2 cores)
  python -m benchmarks.throughput --ranks 1,2 --repeats 3 --steps 40
  make bench-gpus                  # "my N GPUs": every rank count up to the node's GPUs
  python -m benchmarks.throughput --device cuda --ranks auto --batch 1024 --image 3,32,32 \
      --model resnet110 --K 55 --steps 100 --methods dgl+mlaan,dgl,bp

For every rank count N: BP in one process; **BP with DistributedDataParallel** on N ranks
(benchmarks/ddp_bp.py: the global batch split over the ranks, gradient buckets all-reduced
during the backward pass); BP pipelined by torch.distributed.pipelining (GPipe and 1F1B) on N
stages; pipemlaan's methods on N stages and, where N allows (`--replicas`), as replicas x
stages. Every row runs at its device's defaults (CPU: fp32, one thread per rank; CUDA: bf16
autocast and channels-last, CUDA graphs where pipemlaan captures them), and says which; where
a baseline cannot use one, its row says so and why. On CUDA, ranks beyond the visible GPUs
share one: such rows are a functional check, labelled so, and never plotted as speed.

Every configuration is run `--repeats` times, interleaved (A B C A B C ...) so slow drift of the
machine hits all of them alike. Only steady state counts: the first `--warmup` steps (start-up,
pipeline fill, torch.compile's compilation) are excluded, using the per-window images/s every
rank writes to metrics.jsonl. Reported: median images/s and spread (min-max) per configuration,
speed-up over the single-process run of the same method, ratio to BP DDP at the same N and to
1F1B BP, per rank the compute / receive-wait / send / data-wait split and peak memory, and each
run's wall seconds (start-up and compilation included). Results: JSON + Markdown in
benchmarks/results/ and a PNG: images/s against N per configuration beside memory per rank.
The JSON and Markdown are rewritten after every run, and a configuration that fails or passes
`--timeout` is reported as failed while the others go on, so a benchmark cut short keeps what
it measured.
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
SPLIT = ("compute_frac", "recv_wait_frac", "send_wait_frac", "data_wait_frac")


def settings(args, method: str, ranks: int) -> str:
    """The precision, layout and graph settings a row runs at: its device's defaults."""
    if args.device == "cpu":
        return "fp32, 1 thread/rank"
    base = "bf16 autocast, channels-last"
    if method == "bp ddp":
        return base + ", eager (DDP's backward all-reduces are not captured)"
    if method.startswith("bp torch.pipelining"):
        return ("fp32 NCHW, eager (torch.pipelining infers its P2P buffers from fp32 example "
                "inputs; autocast is not wired into its stages here)")
    return base + (", CUDA graph" if ranks <= 1 else ", eager (pipeline ranks are not captured)")


def shared_gpu(args, ranks: int) -> bool:
    """More ranks than visible GPUs: the ranks share one (a functional check, not a speed)."""
    if args.device != "cuda":
        return False
    import torch
    return ranks > max(torch.cuda.device_count(), 1)


def steady(args, run_dir: Path) -> dict:
    """Steady-state figures of a finished run (pipemlaan or benchmarks/ddp_bp.py)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text()
               .splitlines() if line.strip()]
    rows = [r for r in records if r.get("kind") == "train" and r["step"] > args.warmup
            and r["step"] - args.log_every >= args.warmup]
    by_rank: dict[int, list[dict]] = {}
    for r in rows:
        by_rank.setdefault(r["rank"], []).append(r)
    # a pipeline moves at one pace: what comes out of its last rank; data-parallel ranks each
    # train a slice of every batch and log the whole batch's images/s
    last = max(by_rank)
    ips = statistics.fmean(r["images_per_s"] for r in by_rank[last])
    split = {rk: {k: statistics.fmean(r.get(k, 0.0) for r in rs) for k in SPLIT}
             for rk, rs in sorted(by_rank.items())}
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"images_per_s": ips, "per_rank": split,
            "peak_memory_bytes": summary["peak_memory_bytes"],
            "partition": summary["partition"], "cuda_graph": summary.get("cuda_graph"),
            "compile": summary.get("compile"),
            "stage_s": {"predicted": summary.get("predicted_stage_s"),
                        "measured": summary.get("measured_stage_s")}}


def pipemlaan_run(args, method: str, ranks: int, workdir: Path, tag: str,
                  extra: tuple[str, ...] = (), program: tuple[str, ...] = ()) -> dict:
    """One pipemlaan run (or, with `program`, benchmarks/ddp_bp.py from the same flags)."""
    steps = args.steps
    c, h, w = args.image
    common = [
        "--data.name=synthetic", f"--data.synthetic_size={args.batch * (steps + 2)}",
        f"--data.synthetic_image=[{c},{h},{w}]", f"--model.name={args.model}",
        f"--model.K={1 if method == 'bp' else args.K}", f"--train.batch_size={args.batch}",
        "--train.epochs=1", f"--train.max_steps={steps}", f"--train.device={args.device}",
        "--data.test_subset=64",
        f"--run.dir={workdir}", f"--run.name={tag}", "--run.overwrite=true",
        "--run.progress=false", f"--run.log_every={args.log_every}",
        "--pipeline.mode=async", f"--pipeline.in_flight={args.in_flight}",
        "--train.threads=1" if args.device == "cpu" else "--train.threads=0",
        *method_flags(method), *extra]
    # ranks 0: the single process, no torchrun, no process group
    cmd = launch.train_command(ranks, common, program=list(program) or None)
    t0 = time.perf_counter()
    proc = launch.run(cmd, launch.run_env(1), args.timeout)
    run_s = time.perf_counter() - t0
    # engine/compiled.py's one line when a run asked for compilation and went on eagerly
    eager = next((line.strip() for line in proc.stdout.splitlines()
                  if "torch.compile failed" in line or "train.compile=" in line), None)
    out = steady(args, workdir / tag)
    out["run_s"] = run_s
    if eager and not (out.get("compile") or {}).get("off"):
        out["compile"] = {"off": eager}
    return out


def ddp_run(args, ranks: int, workdir: Path, tag: str) -> dict:
    return pipemlaan_run(args, "bp", ranks, workdir, tag,
                         program=("-m", "benchmarks.ddp_bp"))


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


def configurations(args) -> list[tuple[str, callable, dict]]:
    """(label, runner, facts) triples, in the order each repeat runs them; facts: the row's
    method, rank count, settings and whether its ranks share a GPU."""
    confs = []

    def add(label, runner, method, n, suffix=""):
        shared = shared_gpu(args, n)
        label += (" (sharing 1 GPU: functional check)" if shared else "") + suffix
        confs.append((label, runner, {"method": method, "ranks": n, "shared_gpu": shared,
                                      "settings": settings(args, method, n)}))

    for variant, extra in args.variants:
        suffix = f" [{variant}]" if variant else ""
        for method in args.methods:
            if method not in args.variant_methods.get(variant, [method]):
                continue
            for n in args.ranks:
                if method == "bp" and n > 1:
                    continue       # BP on N ranks: DDP and torch.pipelining rows below
                ranks = 0 if n == 1 else n
                add(f"{method} single" if n == 1 else f"{method} {n} ranks",
                    lambda wd, tag, m=method, r=ranks, x=extra: pipemlaan_run(args, m, r, wd,
                                                                              tag, x),
                    method, n, suffix)
                for d in args.replicas:
                    if method != "bp" and n > d and n % d == 0 and d > 1 and n // d > 1:
                        add(f"{method} {d}x{n // d} replicas x stages",
                            lambda wd, tag, m=method, r=n, x=extra, d=d: pipemlaan_run(
                                args, m, r, wd, tag, (*x, f"--pipeline.replicas={d}")),
                            method, n, suffix)
    if "bp" in args.methods:
        for n in args.ranks:
            if n < 2:
                continue
            add(f"bp ddp {n} ranks", lambda wd, tag, r=n: ddp_run(args, r, wd, tag),
                "bp ddp", n)
            for sched in ("gpipe", "1f1b"):
                add(f"bp torch.pipelining {sched} {n} ranks",
                    lambda wd, tag, s=sched, r=n: pipelining_run(args, s, r, wd, tag),
                    f"bp torch.pipelining {sched}", n)
    return confs


def summarise(results: dict[str, list[dict]], facts: dict[str, dict]) -> dict[str, dict]:
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
                      "stage_s": runs[-1].get("stage_s"),
                      "run_s": [r.get("run_s") for r in runs], **facts[label]}
    for label, s in out.items():
        method, variant, n = s["method"], _variant(label), s["ranks"]
        # BP's baselines on N ranks scale the one BP process
        base = out.get(f"{'bp' if method.startswith('bp') else method} single{variant}")
        s["speedup_vs_single"] = s["median"] / base["median"] if base else None
        bp = out.get(f"bp single{variant}")
        s["ratio_vs_bp"] = s["median"] / bp["median"] if bp else None
        # the baselines at the same N (none where the ranks share a GPU: not a speed)
        same_n = {v["method"]: v for v in out.values()
                  if v["ranks"] == n and not v["shared_gpu"]}
        ddp, pipe = same_n.get("bp ddp"), same_n.get("bp torch.pipelining 1f1b")
        real = not s["shared_gpu"] and n > 1
        s["ratio_vs_ddp"] = s["median"] / ddp["median"] if ddp and real else None
        s["ratio_vs_1f1b_bp"] = s["median"] / pipe["median"] if pipe and real else None
    return out


def _variant(label: str) -> str:
    """' [NAME]' at the end of a label run under a variant, else ''."""
    return label[label.rindex(" ["):] if label.endswith("]") else ""


def _x(v) -> str:
    return f"{v:.2f}x" if v else "-"


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
             f"Model {args.model}, K={args.K}, global batch {args.batch}, image {args.image}, "
             f"{args.steps} steps of which the first {args.warmup} are excluded, "
             f"{args.repeats} interleaved repeats; pipemlaan's async pipeline with "
             f"{args.in_flight} batches in flight; torch.pipelining with "
             f"{args.bp_microbatches} microbatches.", "",
             *([f"Variants (train overrides each method ran under): "
                + "; ".join(f"[{v}] `{' '.join(x) or 'defaults'}`" for v, x in args.variants),
                ""] if args.variants[0][0] else []),
             f"Machine: {json.dumps(launch.machine())}", "",
             *([] if complete else ["**Incomplete**: written while the benchmark ran.", ""]),
             "| configuration | settings | images/s median | min-max | vs single process | "
             "vs BP | vs BP DDP (same N) | vs 1F1B BP (same N) | peak memory (MiB, per rank) "
             "| per rank compute / recv wait / send wait / data wait | run s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, s in summary.items():
        split = "; ".join(f"r{r}: {v['compute_frac']:.0%} / {v['recv_wait_frac']:.0%} / "
                          f"{v['send_wait_frac']:.0%} / {v.get('data_wait_frac', 0):.0%}"
                          for r, v in s["per_rank"].items())
        mem = " / ".join(f"{b / 2**20:.0f}" for b in s.get("peak_memory_bytes") or []) or "-"
        run_s = " / ".join(f"{t:.0f}" for t in s.get("run_s") or [] if t is not None)
        lines.append(f"| {label} | {s['settings']} | {s['median']:.1f} | "
                     f"{s['min']:.1f}-{s['max']:.1f} | {_x(s['speedup_vs_single'])} | "
                     f"{_x(s['ratio_vs_bp'])} | {_x(s['ratio_vs_ddp'])} | "
                     f"{_x(s['ratio_vs_1f1b_bp'])} | {mem} | {split or '-'} | {run_s or '-'} |")
    for label, why in (failed or {}).items():
        last = ([line for line in why.splitlines() if line.strip()] or [""])[-1].strip()
        lines.append(f"| {label} | | failed: {last[:200]} | | | | | | | | |")
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if complete and summary:
        plot(summary, args, base.with_suffix(".png"))
    return base


def plot(summary: dict, args, path: Path) -> None:
    """Left: images/s against N for every configuration (shared-GPU rows left out: not a
    speed); right: peak memory per rank at the largest N of each configuration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, mx) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[str, list] = {}
    for label, s in summary.items():
        if s["shared_gpu"]:
            continue
        kind = "pipemlaan " + s["method"] if not s["method"].startswith("bp") or \
            s["ranks"] == 1 and s["method"] == "bp" else s["method"]
        if "replicas" in label:
            kind += " (replicas x stages)"
        if s["method"] == "bp" and s["ranks"] == 1:
            for other in ("bp ddp", "bp torch.pipelining gpipe", "bp torch.pipelining 1f1b"):
                series.setdefault(other, []).append((1, s))
            continue
        series.setdefault(kind + _variant(label), []).append((s["ranks"], s))
    for kind, pts in series.items():
        pts.sort(key=lambda p: p[0])
        if len(pts) < 2 and kind.startswith("bp "):
            continue
        xs = [n for n, _ in pts]
        ys = [s["median"] for _, s in pts]
        err = [[s["median"] - s["min"] for _, s in pts], [s["max"] - s["median"] for _, s in pts]]
        style = "--" if kind.startswith("bp") else "-"
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, ls=style, label=kind)
        _, last = pts[-1]
        mem = [b / 2**20 for b in last.get("peak_memory_bytes") or []]
        if mem:
            mx.plot(range(len(mem)), mem, marker="o", ls=style,
                    label=f"{kind}, {len(mem)} rank{'s' if len(mem) > 1 else ''}")
    ax.set_xlabel("ranks (1 = single process)")
    ax.set_ylabel("images/s (steady state)")
    ax.set_xticks(sorted({s["ranks"] for s in summary.values()}))
    ax.set_title(f"{args.model} K={args.K}, batch {args.batch} ({args.device})")
    ax.legend(fontsize=7)
    mx.set_xlabel("rank")
    mx.xaxis.get_major_locator().set_params(integer=True)
    mx.set_ylabel("peak memory (MiB)")
    mx.set_title("memory per rank, largest N of each configuration")
    mx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def auto_ranks(device: str) -> list[int]:
    """1, 2, 4, ... up to the GPUs torch sees (CUDA) or the cores (CPU)."""
    import torch
    most = torch.cuda.device_count() if device == "cuda" else (os.cpu_count() or 1)
    out, n = [1], 2
    while n <= most:
        out.append(n)
        n *= 2
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--K", type=int, default=4)
    p.add_argument("--methods", default="dgl+mlaan,dgl,bp")
    p.add_argument("--ranks", default="1,2",
                   help="1 = the single process; 'auto': 1, 2, 4, ... up to the visible GPUs "
                        "(CUDA) or the cores (CPU)")
    p.add_argument("--replicas", default="2",
                   help="replica counts D for the D x (N/D) replicas x stages rows, where N allows")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--image", default="1,28,28", help="C,H,W (Fashion-MNIST shapes by default)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--in-flight", type=int, default=2,
                   help="pipemlaan's batches in flight per rank (pipeline.in_flight)")
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
    args.ranks = auto_ranks(args.device) if args.ranks == "auto" else \
        [int(x) for x in args.ranks.split(",")]
    args.replicas = [int(x) for x in args.replicas.split(",") if x.strip()]
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
    facts = {label: f for label, _, f in confs}
    results: dict[str, list[dict]] = {label: [] for label, _, _ in confs}
    failed: dict[str, str] = {}
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M")
    with tempfile.TemporaryDirectory(prefix="pipemlaan-bench-") as tmp:
        for rep in range(args.repeats):
            for i, (label, runner, _) in enumerate(confs):
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
                write_outputs(args, summarise(results, facts), stamp, failed,
                              complete=False)
    summary = summarise(results, facts)
    if not summary:
        console.print("every configuration failed")
        write_outputs(args, summary, stamp, failed)
        return 1
    table = Table(title=f"Steady-state throughput, {args.model} K={args.K}, batch {args.batch}")
    for col in ("configuration", "median img/s", "min-max", "vs single", "vs BP",
                "vs BP DDP", "vs 1F1B BP", "recv wait per rank", "data wait per rank"):
        table.add_column(col, justify="right")
    for label, s in summary.items():
        table.add_row(escape(label), f"{s['median']:.1f}", f"{s['min']:.0f}-{s['max']:.0f}",
                      _x(s["speedup_vs_single"]), _x(s["ratio_vs_bp"]), _x(s["ratio_vs_ddp"]),
                      _x(s["ratio_vs_1f1b_bp"]),
                      " ".join(f"{v['recv_wait_frac']:.0%}" for v in s["per_rank"].values())
                      or "-",
                      " ".join(f"{v.get('data_wait_frac', 0):.0%}"
                               for v in s["per_rank"].values()) or "-")
    console.print(table)
    base = write_outputs(args, summary, stamp, failed)
    console.print(f"wrote {base}.json, .md and .png")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
