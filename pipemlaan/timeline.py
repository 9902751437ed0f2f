"""One timeline of a whole pipeline: every rank's schedule actions on one time axis.

    python -m pipemlaan.timeline RUN_DIR [--steps A B] [--out TRACE.json] [--png PICTURE.png]

Reads what every rank wrote to RUN_DIR/timeline/rank<R>.json (engine/spans.py: the host times
of the last actions its dispatcher ran, and its clock offset to rank 0 measured at start-up)
and writes
- a Chrome / Perfetto trace (RUN_DIR/timeline/trace.json; open it in ui.perfetto.dev or
  chrome://tracing): one process row per rank, each action a complete event ("ph": "X") named
  as the schedule names it, coloured by kind (compute, data, eval, lam, checkpoint, post, recv
  wait, send wait, collective, stop round), an arrow from each message's send to the wait that
  received it; the torch.profiler traces of run.profile_steps (RUN_DIR/traces/rank<R>.json),
  when there are any, merged onto the same axis as a second row per rank (their top-level
  spans);
- a picture of the same steps (RUN_DIR/timeline/timeline.png): a bar per rank, where a
  pipeline's bubbles show as waits and gaps.

`--steps A B`: training steps A to B (the spans recorded between runs of steps, such as an
evaluation or a checkpoint after step B-1, carry the number of steps done, B); the default is
the last three steps every rank recorded. docs/design.md says how to read the picture.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_STEPS = 3
KINDS = ["compute", "data", "eval", "lam", "checkpoint", "post", "recv wait", "send wait",
         "collective", "stop round", "other"]
COLOURS = {"compute": "#2b7bba", "data": "#8fbbd9", "eval": "#6a51a3", "lam": "#31a354",
           "checkpoint": "#8c6d31", "post": "#fdae6b", "recv wait": "#e6550d",
           "send wait": "#fdd0a2", "collective": "#636363", "stop round": "#bdbdbd",
           "other": "#000000"}


class TimelineError(Exception):
    pass


# ---- reading and aligning ---------------------------------------------------------------------
def load(run_dir: Path) -> list[dict]:
    """Every rank's timeline file, rank order, each span's t0/t1 turned into ns of rank 0's
    clock (`a0`, `a1`)."""
    folder = run_dir / "timeline"
    files = sorted(folder.glob("rank*.json"), key=lambda p: int(p.stem[4:]))
    if not files:
        raise TimelineError(f"{folder} holds no rank<R>.json: a run writes them at every "
                            f"checkpoint and at its end; pass the folder of such a run")
    ranks = [json.loads(p.read_text()) for p in files]
    world = ranks[0]["world"]
    missing = sorted(set(range(world)) - {r["rank"] for r in ranks})
    if missing:
        print(f"timeline: no file from rank(s) {missing} (the run stopped before they wrote "
              f"one); showing the others", file=sys.stderr)
    for r in ranks:
        off = r["clock"]["offset_ns"]
        for s in r["spans"]:
            s["a0"], s["a1"] = s["t0"] + off, s["t1"] + off
    return ranks


def training_steps(rank: dict) -> list[int]:
    """The training steps this rank recorded a step's compute for."""
    return sorted({s["step"] for s in rank["spans"] if s["name"].startswith("step[")})


def default_steps(ranks: list[dict], n: int = DEFAULT_STEPS) -> tuple[int, int]:
    lasts = [training_steps(r) for r in ranks]
    if not all(lasts):
        raise TimelineError("a rank recorded no training step: pass --steps A B")
    b = min(x[-1] for x in lasts)
    a = max(b - n + 1, max(x[0] for x in lasts))
    return a, b


def select(ranks: list[dict], a: int, b: int) -> dict[int, list[dict]]:
    """Rank -> its spans of steps [a, b], in time order."""
    return {r["rank"]: sorted((s for s in r["spans"] if a <= s["step"] <= b),
                              key=lambda s: s["a0"]) for r in ranks}


def message_pairs(chosen: dict[int, list[dict]]) -> list[tuple[dict, dict, tuple]]:
    """(the post that sent a message, the wait that received it, the message) for every
    message whose both ends are in `chosen`. A message is (kind, index, src, dst) as the
    schedule names it; evaluation batches repeat their indices every evaluation, so the k-th
    send from the end pairs with the k-th receive from the end."""
    sends: dict[tuple, list[dict]] = {}
    recvs: dict[tuple, list[dict]] = {}
    for spans in chosen.values():
        for s in spans:
            for send, kind, index, src, dst in s.get("msgs", ()):
                key = (kind, index, src, dst)
                if send and s["name"].startswith("post"):
                    sends.setdefault(key, []).append(s)
                elif not send and s["name"].startswith("wait"):
                    recvs.setdefault(key, []).append(s)
    pairs = []
    for key, waits in recvs.items():
        posts = sends.get(key, [])
        for p, w in zip(reversed(posts), reversed(waits)):
            pairs.append((p, w, key))
    return pairs


# ---- torch.profiler traces -------------------------------------------------------------------
def profiler_spans(run_dir: Path, rank: dict, lo: int, hi: int) -> list[dict]:
    """Top-level CPU spans (and GPU kernels) of this rank's run.profile_steps trace that fall in
    [lo, hi] (ns of rank 0's clock). torch.profiler stamps wall-clock microseconds from
    baseTimeNanoseconds; the rank's wall_pair maps them to its perf_counter."""
    path = run_dir / "traces" / f"rank{rank['rank']}.json"
    if not path.is_file():
        return []
    trace = json.loads(path.read_text())
    base = trace.get("baseTimeNanoseconds", 0)
    pair = rank["wall_pair"]
    shift = pair["perf_counter_ns"] - pair["time_ns"] + rank["clock"]["offset_ns"]
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    events.sort(key=lambda e: (e["ts"], -e["dur"]))
    out, ends = [], {}        # per thread, where the last top-level span ends
    for e in events:
        a0 = int(base + e["ts"] * 1000) + shift
        a1 = a0 + int(e["dur"] * 1000)
        if a1 < lo or a0 > hi:
            continue
        kernel = e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
        lane = "kernels" if kernel else "torch.profiler"
        if not kernel:
            if a0 < ends.get(e.get("tid"), -1):
                continue        # inside a span already kept
            ends[e.get("tid")] = a1
        out.append({"a0": a0, "a1": a1, "name": e.get("name", "?"), "lane": lane,
                    "cat": e.get("cat", "")})
    return out


# ---- the outputs ------------------------------------------------------------------------------
def chrome_trace(run_dir: Path, ranks: list[dict], chosen: dict[int, list[dict]],
                 a: int, b: int) -> dict:
    """{"traceEvents": [...]} in microseconds from the first selected span."""
    spans = [s for v in chosen.values() for s in v]
    if not spans:
        raise TimelineError(f"no span of steps {a}-{b} was recorded (the ring keeps the last "
                            f"actions of each rank); choose later --steps")
    origin = min(s["a0"] for s in spans)
    end = max(s["a1"] for s in spans)
    us = lambda ns: (ns - origin) / 1000.0   # noqa: E731
    ev: list[dict] = [{"ph": "M", "name": "process_name", "pid": r["rank"], "tid": 0,
                       "args": {"name": f"rank {r['rank']}"}} for r in ranks]
    ev += [{"ph": "M", "name": "process_sort_index", "pid": r["rank"], "tid": 0,
            "args": {"sort_index": r["rank"]}} for r in ranks]
    for r in ranks:
        rk = r["rank"]
        ev.append({"ph": "M", "name": "thread_name", "pid": rk, "tid": 0,
                   "args": {"name": "schedule actions"}})
        for s in chosen.get(rk, []):
            args = {"step": s["step"]}
            if "all_reduce" in s:
                args["all_reduce"] = s["all_reduce"]
            ev.append({"ph": "X", "name": s["name"], "cat": s["kind"], "pid": rk, "tid": 0,
                       "ts": us(s["a0"]), "dur": (s["a1"] - s["a0"]) / 1000.0, "args": args})
        lanes = {"torch.profiler": 1, "kernels": 2}
        prof = profiler_spans(run_dir, r, origin, end)
        for lane in {p["lane"] for p in prof}:
            ev.append({"ph": "M", "name": "thread_name", "pid": rk, "tid": lanes[lane],
                       "args": {"name": lane}})
        for p in prof:
            ev.append({"ph": "X", "name": p["name"], "cat": p["cat"], "pid": rk,
                       "tid": lanes[p["lane"]], "ts": us(p["a0"]),
                       "dur": (p["a1"] - p["a0"]) / 1000.0})
    for i, (post, wait, key) in enumerate(message_pairs(chosen)):
        name = f"{key[0]}[{key[1]}] {key[2]}->{key[3]}"
        ev.append({"ph": "s", "id": i, "name": name, "cat": "message", "pid": key[2],
                   "tid": 0, "ts": us(post["a0"])})
        ev.append({"ph": "f", "bp": "e", "id": i, "name": name, "cat": "message",
                   "pid": key[3], "tid": 0, "ts": us(wait["a1"]) - 0.001})
    clock = {str(r["rank"]): r["clock"] for r in ranks}
    return {"traceEvents": ev, "displayTimeUnit": "ms",
            "otherData": {"run": str(run_dir), "steps": [a, b], "clock_offsets": clock}}


def picture(chosen: dict[int, list[dict]], path: Path, a: int, b: int, title: str) -> None:
    """A bar per rank (rank 0 on top), each action coloured by kind, milliseconds from the
    first action shown; a step's compute carries its batch's index (a window backward the
    index and "b")."""
    import matplotlib                 # only the picture needs it: the trace does not
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    spans = [s for v in chosen.values() for s in v]
    origin = min(s["a0"] for s in spans)
    width = (max(s["a1"] for s in spans) - origin) / 1e6
    rows = sorted(chosen)
    fig, ax = plt.subplots(figsize=(11, 0.55 * len(rows) + 1.3), dpi=100)
    used = set()
    for i, rk in enumerate(rows):
        y = len(rows) - 1 - i
        by_kind: dict[str, list] = {}
        for s in chosen[rk]:
            x, w = (s["a0"] - origin) / 1e6, max((s["a1"] - s["a0"]) / 1e6, 1e-3)
            by_kind.setdefault(s["kind"], []).append((x, w))
            if s["name"].startswith(("step[", "backward[")) and w > width / 60:
                # which batch each compute is: the pipeline's stagger reads off these
                label = s["name"].split("[")[1].rstrip("]") + ("b" if s["name"][0] == "b"
                                                               else "")
                ax.text(x + w / 2, y, label, ha="center", va="center", fontsize=7,
                        color="white")
        for kind, bars in by_kind.items():
            used.add(kind)
            ax.broken_barh(bars, (y - 0.38, 0.76), facecolors=COLOURS.get(kind, "#000000"),
                           linewidth=0)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"rank {rk}" for rk in reversed(rows)])
    ax.set_xlabel("milliseconds (host time, aligned to rank 0's clock)")
    ax.set_title(title, fontsize=10)
    ax.set_xlim(left=0)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(handles=[Patch(color=COLOURS[k], label=k) for k in KINDS if k in used],
              loc="upper center", bbox_to_anchor=(0.5, -0.2 - 0.3 / len(rows)),
              ncol=len(used), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipemlaan.timeline", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--steps", type=int, nargs=2, metavar=("A", "B"),
                   help=f"training steps A..B (default: the last {DEFAULT_STEPS} recorded)")
    p.add_argument("--out", type=Path, help="trace file (default RUN_DIR/timeline/trace.json)")
    p.add_argument("--png", type=Path, help="picture (default RUN_DIR/timeline/timeline.png)")
    p.add_argument("--no-png", action="store_true", help="write the trace only")
    args = p.parse_args(argv)
    try:
        ranks = load(args.run_dir)
        a, b = args.steps if args.steps else default_steps(ranks)
        chosen = select(ranks, a, b)
        trace = chrome_trace(args.run_dir, ranks, chosen, a, b)
    except TimelineError as e:
        print(f"pipemlaan.timeline: error: {e}", file=sys.stderr)
        return 2
    out = args.out or args.run_dir / "timeline" / "trace.json"
    out.write_text(json.dumps(trace))
    print(f"wrote {out} (steps {a}-{b}, {len(ranks)} ranks): open it in ui.perfetto.dev")
    if not args.no_png:
        png = args.png or args.run_dir / "timeline" / "timeline.png"
        try:
            picture(chosen, png, a, b, f"{args.run_dir.name}: steps {a}-{b}")
        except ImportError:
            print("pipemlaan.timeline: the picture needs matplotlib (pip install matplotlib); "
                  "the trace is written", file=sys.stderr)
            return 0
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
