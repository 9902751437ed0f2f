"""One timeline of the pipeline (`python -m pipemlaan.timeline`, engine/spans.py): on 2- and
4-rank runs (a thread per rank here; test_pipeline.py checks the torchrun launches of 2 and 4
ranks the same way) every rank's row is there, a rank's spans never overlap, every receive ends
after its send was posted, the picture is written; torch.profiler traces merge onto the axis.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_timeline.py -q
"""

from __future__ import annotations

import json
from collections import deque

import pytest

from inprocess import run_ranks
from pipemlaan.engine.schedule import Compute
from pipemlaan.engine.spans import ActionSpans
from pipemlaan.timeline import main as timeline_main
from runs import TINY
from timelines import (check_receives_follow_sends, check_timeline, rank_files)

# 4 async steps with a checkpoint after step 1, an evaluation and a checkpoint at the end
SHORT = [*TINY, "--data.synthetic_size=64", "--data.test_subset=32", "--train.epochs=1",
         "--pipeline.mode=async", "--run.checkpoint_steps=2", "--run.progress=false",
         "--run.tensorboard=false"]


def _run(tmp_path, ranks: int, extra=()):
    args = [*SHORT, f"--pipeline.partition=[{','.join([str(4 // ranks)] * ranks)}]", *extra,
            f"--run.dir={tmp_path}", "--run.name=run"]
    run_ranks(args if ranks > 1 else [a for a in args if "partition" not in a], ranks)
    return tmp_path / "run"


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """The 2- and 4-rank runs, each made once for this module's tests."""
    made = {}

    def get(ranks: int):
        if ranks not in made:
            made[ranks] = _run(tmp_path_factory.mktemp(f"ranks{ranks}"), ranks)
        return made[ranks]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 4])
def test_every_rank_on_one_axis(tmp_path, pipelines, ranks):
    run = pipelines(ranks)
    trace = check_timeline(run, ranks, tmp_path / "out", (0, 4))
    kinds = {e["cat"] for e in trace["traceEvents"] if e["ph"] == "X"}
    # the steps, their messages, the evaluation and the checkpoints after them
    assert {"compute", "post", "recv wait", "send wait", "eval", "checkpoint",
            "collective"} <= kinds, kinds
    # the default range: the last three training steps every rank recorded
    default_out = tmp_path / "default.json"
    assert timeline_main([str(run), "--no-png", "--out", str(default_out)]) == 0
    default = json.loads(default_out.read_text())
    assert default["otherData"]["steps"] == [1, 3]


@pytest.mark.slow
def test_the_causality_check_sees_a_wrong_clock(pipelines):
    """Negative control: with rank 1's clock moved 10 s early, its receives end before rank
    0's sends began, and the check says so."""
    files = rank_files(pipelines(2))
    assert check_receives_follow_sends(files) > 0
    files[1]["clock"]["offset_ns"] -= 10 ** 10
    with pytest.raises(AssertionError, match="before it was sent"):
        check_receives_follow_sends(files)


@pytest.mark.slow
def test_profiler_traces_merge_onto_the_axis(tmp_path):
    """run.profile_steps traces (wall-clock stamps) land on the same axis as the spans: the
    profiled forward of step 2 lies inside that step's compute span."""
    run = _run(tmp_path, 1, ["--run.profile_steps=[2,2]"])
    assert (run / "traces" / "rank0.json").is_file()
    out = tmp_path / "trace.json"
    assert timeline_main([str(run), "--steps", "2", "2", "--out", str(out), "--no-png"]) == 0
    ev = json.loads(out.read_text())["traceEvents"]
    step = next(e for e in ev if e["ph"] == "X" and e["name"] == "step[2]")
    fwd = [e for e in ev if e["ph"] == "X" and e["tid"] == 1 and e["name"] == "module 0 forward"]
    assert fwd, "no profiler span merged"
    # wall clock and perf_counter are read a few microseconds apart: 1 ms of slack
    assert any(step["ts"] - 1000 <= e["ts"] and e["ts"] + e["dur"] <= step["ts"] +
               step["dur"] + 1000 for e in fwd)


def test_the_ring_keeps_the_last_actions_and_the_file_says_so(tmp_path):
    spans = ActionSpans(maxlen=3)
    for t in range(5):
        spans.add((10 * t, 10 * t + 5, t, Compute("step", t)))
    assert isinstance(spans.ring, deque)
    path = spans.write(tmp_path, 0, 1)
    got = json.loads(path.read_text())
    assert [s["step"] for s in got["spans"]] == [2, 3, 4]
    assert got["dropped_before"] and got["spans"][0] == {
        "t0": 20, "t1": 25, "step": 2, "name": "step[2]", "kind": "compute"}


def test_a_folder_without_a_timeline_is_one_error_line(tmp_path, capsys):
    assert timeline_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pipemlaan.timeline: error:")
