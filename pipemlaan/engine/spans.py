"""When each schedule action ran on this rank: an always-on ring of action spans, the ranks'
clock offsets, and the per-rank file `python -m pipemlaan.timeline` puts on one time axis.

The trainer's dispatcher (engine/trainer.py `_run`) executes every action of the schedule, so
timing it there times everything a rank does after start-up: compute, the post and the wait of
each message, LAM, collectives, evaluation, checkpoints. Per action it appends one tuple
(t0, t1, step, action) to a bounded deque: two `time.perf_counter_ns` reads and no other
allocation (the action object is the schedule's own), no device synchronisation (on CUDA the
spans are host times: when the host issued or waited, not when the kernels ran). The ring keeps
the last RING actions (a few hundred steps of a small pipeline), so it costs a fixed few MB.

The ring is written to <run>/timeline/rank<R>.json at every checkpoint and when the trainer
closes (the end of the run, a failure, a preemption), with:
- `clock`: this rank's offset to rank 0's clock, measured once at start-up (`measure_clock`,
  from start-up's own collectives: the schedule decides every cross-rank call after that);
- `wall_pair`: a perf_counter reading and the wall clock at the same moment, which maps
  torch.profiler traces (run.profile_steps, wall-clock microseconds) onto the same axis.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from pathlib import Path

from pipemlaan.engine.distributed import DistEnv, broadcast, gather_all
from pipemlaan.engine.schedule import (LAM, Collective, Compute, Post, StartCollective, Wait,
                                       WaitCollective)

RING = 16384           # actions kept: ~3 MB of tuples
CLOCK_ROUNDS = 8
VERSION = 1

# Compute actions by what they are (colours in the timeline's picture)
COMPUTE_KINDS = {"step": "compute", "backward": "compute", "load": "data",
                 "load_eval": "data", "eval": "eval", "lam_ema": "lam", "lam_pack": "lam",
                 "write_checkpoint": "checkpoint", "write_meta": "checkpoint"}


class ActionSpans:
    """The ring. `add` is the deque's own append: the dispatcher calls it once per action."""

    def __init__(self, maxlen: int = RING):
        self.ring: deque = deque(maxlen=maxlen)
        self.add = self.ring.append
        self.clock = {"offset_ns": 0, "uncertainty_ns": 0, "rounds": 0}

    def write(self, folder: Path, rank: int, world: int) -> Path:
        """<folder>/rank<R>.json, replaced atomically (a reader never sees half a file)."""
        folder.mkdir(parents=True, exist_ok=True)
        spans = [describe(t0, t1, step, act) for t0, t1, step, act in list(self.ring)]
        out = {"version": VERSION, "rank": rank, "world": world, "clock": self.clock,
               "wall_pair": {"perf_counter_ns": time.perf_counter_ns(),
                             "time_ns": time.time_ns()},
               "dropped_before": len(self.ring) == self.ring.maxlen, "spans": spans}
        path = folder / f"rank{rank}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(out, separators=(",", ":")))
        os.replace(tmp, path)
        return path


def describe(t0: int, t1: int, step: int, act) -> dict:
    """One span as the file holds it: times in ns of this rank's perf_counter, the step it
    belongs to (a training step's index; between runs of steps, the steps done), its kind
    (compute, data, eval, lam, checkpoint, post, recv wait, send wait, collective, stop
    round), its name (the schedule's), and for a post or wait its messages as
    [send?, kind, index, src, dst]."""
    d = {"t0": t0, "t1": t1, "step": step, "name": str(act)}
    if isinstance(act, Compute):
        d["kind"] = COMPUTE_KINDS.get(act.name, "compute")
        if act.collective:
            d["all_reduce"] = act.collective    # replica gradient all-reduces inside
    elif isinstance(act, Post):
        d["kind"] = "lam" if all(op.msg.kind == LAM for op in act.ops) else "post"
        d["msgs"] = [_msg(op) for op in act.ops]
    elif isinstance(act, Wait):
        d["kind"] = ("lam" if act.op.msg.kind == LAM else
                     "send wait" if act.op.send else "recv wait")
        d["msgs"] = [_msg(act.op)]
    elif isinstance(act, Collective):
        d["kind"] = "collective"
    elif isinstance(act, (StartCollective, WaitCollective)):
        d["kind"] = "stop round"
    else:
        d["kind"] = "other"
    return d


def _msg(op) -> list:
    m = op.msg
    return [op.send, m.kind, m.index, m.src, m.dst]


def measure_clock(env: DistEnv, rounds: int = CLOCK_ROUNDS) -> dict:
    """This rank's offset to rank 0's perf_counter (rank 0 time = local time + offset_ns), and
    a bound on its error, from `rounds` start-up exchanges, each a broadcast from rank 0 and a
    gather to it. Causality bounds the offset o of rank r: r returns from rank 0's broadcast
    (its time b) only after rank 0 began it (rank 0's time a), so o >= a - b; rank 0 returns
    from the gather (d) only after r entered it (c), so o <= d - c. The bounds of all rounds
    intersect; the midpoint is the offset, half the width its uncertainty. Ranks on one host
    share CLOCK_MONOTONIC, so there the offset is within the uncertainty of 0."""
    if not env.distributed:
        return {"offset_ns": 0, "uncertainty_ns": 0, "rounds": 0}
    now = time.perf_counter_ns
    lo = [-(1 << 62)] * env.world
    hi = [1 << 62] * env.world
    for _ in range(rounds):
        a = now()
        broadcast(env, None)
        b = now()
        got = gather_all(env, (b, now()))
        d = now()
        if env.rank == 0:
            for r, (br, cr) in enumerate(got):
                lo[r], hi[r] = max(lo[r], a - br), min(hi[r], d - cr)
    both = None
    if env.rank == 0:
        both = [(0, 0)] + [((lo[r] + hi[r]) // 2, (hi[r] - lo[r] + 1) // 2)
                           for r in range(1, env.world)]
    offset, uncertainty = broadcast(env, both)[env.rank]
    return {"offset_ns": offset, "uncertainty_ns": uncertainty, "rounds": rounds}
