"""Checks a recorded run (engine/call_log.py) against its schedule: each rank's record against
`schedule.program` rebuilt from the run's configuration alone.

Not a test module; imported by test_order.py (in-process runs) and test_pipeline.py (a torchrun
launch). See test_order.py for what is checked.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipemlaan.config import load_config
from pipemlaan.data import dataset_spec
from pipemlaan.engine.placement import Placement
from pipemlaan.engine.schedule import (Collective, Compute, Post, RankSchedule,
                                       StartCollective, Wait, WaitCollective, pipe_spec,
                                       program, run_events)
from pipemlaan.local.module import build_local_modules, window_plan

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
    spec = pipe_spec(plan, placement, lockstep=lockstep, in_flight=p.in_flight,
                     lam_every=p.lam_sync_every, total_steps=total)
    if stop_at is not None:
        spec = spec.with_end(stop_at)
    test_samples = cfg.data.test_subset or max(256, cfg.data.synthetic_size // 4)
    eval_batches = -(-test_samples // (t.batch_size // D))
    events = run_events(steps_per_epoch=spe, total_steps=total, start=start,
                        eval_every=t.eval_every, checkpoint_every=cfg.run.checkpoint_every,
                        checkpoint_steps=cfg.run.checkpoint_steps, stop_at=stop_at,
                        eval_first=eval_first, eval_steps=t.eval_every_steps)
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


def summary_partition(run_dir: Path) -> list[int]:
    return json.loads((run_dir / "summary.json").read_text())["partition"]
