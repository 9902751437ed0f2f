"""Every call a rank makes to another rank comes from its schedule, in the schedule's order.

Real runs are recorded (engine/call_log.py: each action the trainer's dispatcher executes, and
each call that crosses ranks with the action it was made in), and each rank's record is
compared with `schedule.program` for that run, rebuilt here from the run's configuration alone:
the same actions in the same order; every call made inside an action of the kind that makes it
(a Post posts exactly its operations, a Collective makes one collective call, a Compute only the
replica all-reduces the schedule marks); nothing made outside an action once the program began.
Cases: mid-epoch checkpoints with the non-finite agreement (nonfinite=stop), nonfinite=skip,
data-parallel replicas, a resumed run, a run stopped by the stop agreement and its resumption,
in one process (a thread per rank); test_pipeline.py checks a torchrun launch (4 ranks, gloo) the
same way. The simulator proves the programs themselves (tests/test_schedule.py), so what the
program lists is what runs.

Run: .venv/bin/python -m pytest tests/test_order.py -q
"""

from __future__ import annotations

import json

import pytest

from inprocess import run_ranks
from recorded import check_record, check_run, expected_programs, summary_partition
from runs import ASYNC, DP_LR, DP_SYNC, LOCKSTEP, MLAAN

# ---- in one process, a thread per rank --------------------------------------------------------
CASES = {
    # async, a stage boundary every window crosses, LAM both ways, mid-epoch checkpoints and
    # the non-finite agreement before each
    "checkpoints": (2, [*ASYNC, *MLAAN, "--run.checkpoint_steps=5", "--pipeline.in_flight=2",
                        "--pipeline.partition=[2,2]"]),
    "nonfinite-skip": (2, [*LOCKSTEP, *MLAAN, "--train.nonfinite=skip",
                           "--run.checkpoint_steps=3", "--pipeline.partition=[2,2]"]),
    "replicas": (4, [*LOCKSTEP, *MLAAN, *DP_LR, *DP_SYNC, "--pipeline.partition=[2,2]"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_recorded_calls_follow_the_program(tmp_path, case):
    ranks, args = CASES[case]
    args = [*args, f"--run.dir={tmp_path}", "--run.name=run"]
    run_ranks(args, ranks, record_dir=tmp_path / "record")
    check_run(tmp_path / "record", expected_programs(args, ranks,
                                                     summary_partition(tmp_path / "run")))


def test_a_resumed_run_follows_its_program(tmp_path):
    """The first launch stops at max_steps mid-epoch; the second resumes there (a resumed
    async run republishes the LAM snapshots its first steps take, from the owners' history)."""
    base = [*ASYNC, *MLAAN, "--pipeline.partition=[1,3]", f"--run.dir={tmp_path}",
            "--run.name=run"]
    first = [*base, "--train.max_steps=11"]
    run_ranks(first, 2, record_dir=tmp_path / "first")
    check_run(tmp_path / "first", expected_programs(first, 2, [1, 3]))
    second = [*base, "--run.resume=true"]
    run_ranks(second, 2, record_dir=tmp_path / "second")
    check_run(tmp_path / "second", expected_programs(second, 2, [1, 3], start=11))


def test_a_stopped_run_and_its_resumption_follow_their_programs(tmp_path):
    """Rank 1 is asked to stop before the run begins (as a SIGTERM would): every rank stops
    where the first stop round says, 1 + D + L, with a checkpoint; then the run resumes."""
    base = [*ASYNC, *MLAAN, "--pipeline.partition=[2,2]", "--pipeline.in_flight=2",
            f"--run.dir={tmp_path}", "--run.name=run"]
    res = run_ranks(base, 2, record_dir=tmp_path / "first", stop_ranks=(1,))
    at = res["stopped_at"]
    assert at == 1 + (2 * 2 * 1 + 2) + 2, at          # 1 + D + L for 2 stages, M = 2
    check_run(tmp_path / "first", expected_programs(base, 2, [2, 2], stop_at=at))
    second = [*base, "--run.resume=true"]
    run_ranks(second, 2, record_dir=tmp_path / "second")
    check_run(tmp_path / "second", expected_programs(second, 2, [2, 2], start=at))


def test_the_check_catches_a_call_outside_the_schedule(tmp_path):
    """Negative control: a record with one extra call (a barrier between two actions, as the
    checkpoint code once made by hand) fails the check."""
    args = [*LOCKSTEP, *MLAAN, "--train.epochs=1", "--pipeline.partition=[2,2]",
            f"--run.dir={tmp_path}", "--run.name=run"]
    run_ranks(args, 2, record_dir=tmp_path / "record")
    progs = expected_programs(args, 2, [2, 2])
    path = tmp_path / "record" / "rank0.jsonl"
    lines = path.read_text().splitlines()
    k = next(i for i, x in enumerate(lines) if '"write_checkpoint' in x)
    lines.insert(k + 1, json.dumps({"call": "barrier", "in": None}))
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(AssertionError, match="outside any action"):
        check_record(path, progs[0])
