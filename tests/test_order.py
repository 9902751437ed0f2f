"""Every call a rank makes to another rank comes from its schedule, in the schedule's order.

Real runs are recorded (engine/record.py: each action the trainer's dispatcher executes, and
each call that crosses ranks with the action it was made in), and each rank's record is
compared with `schedule.program` for that run, rebuilt here from the run's configuration alone:
the same actions in the same order; every call made inside an action of the kind that makes it
(a Post posts exactly its operations, a Collective makes one collective call, a Compute only the
replica all-reduces the schedule marks); nothing made outside an action once the program began.
Cases: mid-epoch checkpoints with the non-finite agreement (nonfinite=stop), nonfinite=skip,
data-parallel replicas, a resumed run, a run stopped by the stop agreement and its resumption,
in one process (a thread per rank) and under torchrun (2 ranks, gloo). The simulator proves the
programs themselves (tests/test_schedule.py), so what the program lists is what runs.

Run: .venv/bin/python -m pytest tests/test_order.py -q
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pipemlaan.config import load_config
from pipemlaan.data import dataset_spec
from pipemlaan.engine.placement import Placement
from pipemlaan.engine.schedule import (Collective, Compute, Post, RankSchedule,
                                       StartCollective, Wait, WaitCollective, pipe_spec,
                                       program, run_events)
from pipemlaan.local.module import build_local_modules, window_plan

from inprocess import run_ranks
from launching import REPO, TORCHRUN, launch_env
from runs import ASYNC, DP_LR, DP_SYNC, LOCKSTEP, MLAAN

# calls a rank makes while it starts up, before its program: process groups, the handshake
# with its neighbours, agreeing on start-up errors, partition and data lengths, the resume
STARTUP = {"create_groups", "post", "wait", "all_gather_object", "broadcast_object", "barrier"}
ALLOWED = {Post: {"post"}, Wait: {"wait"}, Collective: {"all_gather_object", "barrier"},
           StartCollective: {"start_all_reduce"}, WaitCollective: {"wait"}}


def expected_programs(args: list[str], ranks: int, partition: list[int], start: int = 0,
                      stop_at: int | None = None, eval_first: bool = False) -> dict:
    """Each rank's program for a run of `args` on `ranks` ranks, from its configuration."""
    cfg = load_config(None, args)
    spec_d = dataset_spec(cfg.data)
    _, modules = build_local_modules(cfg, spec_d)
    plan = window_plan(cfg, len(modules))
    t, p = cfg.train, cfg.pipeline
    D = p.replicas
    spe = cfg.data.synthetic_size // t.batch_size
    total = t.epochs * spe if not t.max_steps else min(t.epochs * spe, t.max_steps)
    lockstep = p.mode == "lockstep" or ranks // D == 1
    placement = Placement.of(partition, D, modules, cfg.method.ema_only_last)
    spec = pipe_spec(plan, placement, lockstep=lockstep, in_flight=p.microbatches,
                     lam_every=p.lam_sync_every, total_steps=total)
    if stop_at is not None:
        spec = spec.with_end(stop_at)
    test_samples = cfg.data.test_subset or max(256, cfg.data.synthetic_size // 4)
    eval_batches = -(-test_samples // (t.batch_size // D))
    events = run_events(steps_per_epoch=spe, total_steps=total, start=start,
                        eval_every=t.eval_every, checkpoint_every=cfg.run.checkpoint_every,
                        checkpoint_steps=cfg.run.checkpoint_steps, stop_at=stop_at,
                        eval_first=eval_first)
    return {r: program(RankSchedule(spec, r, start, t.nonfinite == "stop"), events,
                       eval_batches) for r in range(ranks)}


def check_record(path: Path, prog: list) -> None:
    """A rank's record against its program (see the module docstring)."""
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    done = [x["action"] for x in lines if "action" in x]
    want = [str(a) for a in prog]
    first = next((i for i, (a, b) in enumerate(zip(done, want)) if a != b),
                 min(len(done), len(want)))
    assert done == want, (f"{path.name}: the run did {len(done)} actions, its program lists "
                          f"{len(want)}; first difference at #{first}: ran "
                          f"{done[first:first + 3]}, program {want[first:first + 3]}")
    i, calls = -1, []
    for x in lines:
        if "action" in x:
            if i >= 0:
                _check_calls(prog[i], calls, path.name, i)
            i, calls = i + 1, []
            continue
        if i < 0:
            assert x["call"] in STARTUP, f"{path.name}: {x} before the program"
            continue
        assert x["in"] == str(prog[i]), \
            f"{path.name}: {x['call']} made outside any action (after #{i}, {prog[i]})"
        calls.append(x)
    if i >= 0:
        _check_calls(prog[i], calls, path.name, i)


def _check_calls(act, calls: list[dict], who: str, i: int) -> None:
    kinds = [c["call"] for c in calls]
    where = f"{who} action #{i} {act}"
    if isinstance(act, Compute):
        allowed = {"all_reduce"} if act.collective else set()
        assert set(kinds) <= allowed, f"{where} made {kinds}"
        assert all(c["group"] == act.collective for c in calls), where
        return
    assert set(kinds) <= ALLOWED[type(act)], f"{where} made {kinds}"
    if isinstance(act, Post):
        assert kinds == ["post"], f"{where} made {kinds}"
        posted = {(send, peer, group) for send, peer, group, _ in calls[0]["ops"]}
        assert posted == {(op.send, op.peer, op.group) for op in act.ops}, f"{where}: {posted}"
    elif isinstance(act, Wait):
        assert kinds and all(c["peer"] == act.op.peer for c in calls), f"{where}: {calls}"
    else:
        assert len(kinds) == 1, f"{where} made {kinds}"
        if isinstance(act, StartCollective):
            assert calls[0]["group"] == act.group, where


def check_run(record_dir: Path, programs: dict) -> None:
    for r, prog in programs.items():
        check_record(record_dir / f"rank{r}.jsonl", prog)


def _summary_partition(run_dir: Path) -> list[int]:
    return json.loads((run_dir / "summary.json").read_text())["partition"]


# ---- in one process, a thread per rank --------------------------------------------------------
CASES = {
    # async, a stage boundary every window crosses, LAM both ways, mid-epoch checkpoints and
    # the non-finite agreement before each
    "checkpoints": (2, [*ASYNC, *MLAAN, "--run.checkpoint_steps=5", "--pipeline.microbatches=2",
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
                                                     _summary_partition(tmp_path / "run")))


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
    base = [*ASYNC, *MLAAN, "--pipeline.partition=[2,2]", "--pipeline.microbatches=2",
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


# ---- under torchrun ---------------------------------------------------------------------------
def test_torchrun_run_follows_its_program(tmp_path):
    """Two processes over gloo: start-up, async steps with LAM both ways, mid-epoch
    checkpoints, evaluation, the summary and the barrier at exit."""
    args = [*ASYNC, *MLAAN, "--run.checkpoint_steps=7", "--pipeline.partition=[2,2]",
            f"--run.dir={tmp_path}", "--run.name=run"]
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2",
                           "--monitor-interval=0.5", "-m", "pipemlaan.train", *args],
                          cwd=REPO, env=launch_env(PIPEMLAAN_RECORD_COMM=str(tmp_path / "rec")),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_run(tmp_path / "rec", expected_programs(args, 2, [2, 2]))
