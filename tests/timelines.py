"""Checks of what a run leaves for its dashboards: the timeline (pipemlaan/timeline.py over
engine/spans.py's files) and the TensorBoard event files (pipemlaan/trackers.py), read back
with tensorboard's own reader.

Not a test module; imported by test_timeline.py, test_trackers.py (in-process runs) and
test_pipeline.py (torchrun launches of 2 and 4 ranks).
"""

from __future__ import annotations

import json
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipemlaan.timeline import main as timeline_main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def rank_files(run_dir: Path) -> dict[int, dict]:
    return {int(p.stem[4:]): json.loads(p.read_text())
            for p in (run_dir / "timeline").glob("rank*.json")}


def check_spans_never_overlap(files: dict[int, dict]) -> None:
    """The dispatcher runs one action at a time: a rank's spans follow each other."""
    for r, f in files.items():
        spans = f["spans"]
        assert spans, f"rank {r} recorded no action"
        for a, b in zip(spans, spans[1:]):
            assert a["t0"] <= a["t1"] <= b["t0"], f"rank {r}: {a['name']} overlaps {b['name']}"


def check_receives_follow_sends(files: dict[int, dict]) -> int:
    """Every receive's wait ends after the post of its send began, on rank 0's clock (each
    rank's start-up offset applied), to within the two ranks' stated clock uncertainty.
    Messages are matched by the schedule's names (kind, index, src, dst); evaluation batches
    repeat their names every evaluation, so occurrences pair in order. Returns the number of
    messages checked."""
    sends: dict[tuple, list] = {}
    recvs: dict[tuple, list] = {}
    for r, f in files.items():
        off = f["clock"]["offset_ns"]
        for s in f["spans"]:
            for send, kind, index, src, dst in s.get("msgs", ()):
                key = (kind, index, src, dst)
                if send and s["name"].startswith("post"):
                    sends.setdefault(key, []).append(s["t0"] + off)
                elif not send and s["name"].startswith("wait"):
                    recvs.setdefault(key, []).append(s["t1"] + off)
    assert recvs, "no receive recorded"
    unc = {r: f["clock"]["uncertainty_ns"] for r, f in files.items()}
    n = 0
    for key, ends in recvs.items():
        posted = sends.get(key, [])
        assert len(posted) == len(ends), f"{key}: {len(posted)} sends, {len(ends)} receives"
        for p, e in zip(posted, ends):
            slack = unc[key[2]] + unc[key[3]]
            assert e >= p - slack, (f"{key}: received {(p - e) / 1e3:.1f} us before it was "
                                    f"sent (clock uncertainty {slack / 1e3:.1f} us)")
            n += 1
    return n


def check_timeline(run_dir: Path, world: int, out: Path, steps: tuple[int, int]) -> dict:
    """`python -m pipemlaan.timeline` on a run (in this process): every rank's row, spans that
    never overlap, receives after their sends, the picture. Returns the trace."""
    files = rank_files(run_dir)
    assert sorted(files) == list(range(world)), sorted(files)
    for r, f in files.items():
        assert f["world"] == world and f["clock"]["rounds"] > 0 and f["rank"] == r
    assert files[0]["clock"] == {"offset_ns": 0, "uncertainty_ns": 0,
                                 "rounds": files[0]["clock"]["rounds"]}
    check_spans_never_overlap(files)
    assert check_receives_follow_sends(files) > 0
    out.mkdir(parents=True, exist_ok=True)
    trace_path, png = out / "trace.json", out / "timeline.png"
    assert timeline_main([str(run_dir), "--steps", str(steps[0]), str(steps[1]),
                          "--out", str(trace_path), "--png", str(png)]) == 0
    trace = json.loads(trace_path.read_text())
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["tid"] == 0]
    assert {e["pid"] for e in xs} == set(range(world)), "a rank's row is missing"
    for r in range(world):
        row = sorted((e for e in xs if e["pid"] == r), key=lambda e: e["ts"])
        assert all(e["dur"] >= 0 for e in row)
        for a, b in zip(row, row[1:]):
            assert a["ts"] + a["dur"] <= b["ts"] + 1e-3, f"rank {r}: {a} overlaps {b}"
        assert {e["args"]["step"] for e in row} <= set(range(steps[0], steps[1] + 1))
    names = {e["name"] for e in xs}
    assert any(n.startswith("step[") for n in names), names
    flows = [e for e in trace["traceEvents"] if e["ph"] in ("s", "f")]
    assert flows and len(flows) % 2 == 0, "no message arrows"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000
    return trace


def check_clock_offsets_on_one_host(run_dir: Path) -> None:
    """Ranks on one host share CLOCK_MONOTONIC: the measured offset of every rank is 0 to
    within its stated uncertainty (the causality bounds hold whatever the machine's load)."""
    for r, f in rank_files(run_dir).items():
        c = f["clock"]
        assert abs(c["offset_ns"]) <= c["uncertainty_ns"], (r, c)


# ---- TensorBoard -----------------------------------------------------------------------------
def read_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """tag -> step -> value, as TensorBoard's own reader gives them (purged steps dropped)."""
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def check_tensorboard(run_dir: Path, world: int) -> dict[int, dict]:
    """Each rank's event folder holds its modules' losses at every logged step (equal to
    metrics.jsonl's), its images/s, time shares, memory and learning rate; rank 0 also every
    evaluation (each module's test error, top-1, top-5). Returns rank -> its scalars."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    got = {}
    for r in range(world):
        tags = read_scalars(run_dir / "tensorboard" / f"rank{r}")
        got[r] = tags
        mine = [x for x in lines if x["kind"] == "train" and x["rank"] == r]
        assert mine, f"rank {r} logged no train line"
        for x in mine:
            for k, v in x["losses"].items():
                assert abs(tags[f"loss/module_{k}"][x["step"]] - v) <= 1e-6 * max(1, abs(v))
            assert tags["throughput/images_per_s"][x["step"]] > 0
            assert abs(tags["train/lr"][x["step"]] - x["lr"]) <= 1e-6 * x["lr"]
        for tag in ("time/compute_frac", "time/recv_wait_frac", "time/send_wait_frac",
                    "memory/peak_memory_mib"):
            assert set(tags[tag]) == {x["step"] for x in mine}, (r, tag)
    evals = [x for x in lines if x["kind"] == "eval"]
    assert evals
    for x in evals:
        t0 = got[0]
        assert abs(t0["eval/test_top1_error"][x["step"]] - x["test_top1_error"]) < 1e-4
        assert abs(t0["eval/test_top5_error"][x["step"]] - x["test_top5_error"]) < 1e-4
        for k, e in enumerate(x["per_module_test_error"]):
            if e is not None:
                assert abs(t0[f"eval/per_module_test_error/module_{k}"][x["step"]] - e) < 1e-4
    return got
