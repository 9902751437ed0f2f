"""A record of every call a rank makes to other ranks, with the schedule action that made it.

`RecordingComm` wraps a transport (engine/comm.py) and appends one JSON line per event to a
file: `{"action": "..."}` when the trainer's dispatcher starts an action of the schedule
(engine/trainer.py `_run` names it through `Comm.doing`), and `{"call": ..., "in": action}`
for each call that crosses ranks. tests/test_order.py compares a real run's record with the
run's `schedule.program`: the same actions in the same order, every call made inside the
action that the schedule says makes it, and none made outside one after start-up.

Switched on by the environment variable PIPEMLAAN_RECORD_COMM=<folder> (one file per rank,
rank<R>.jsonl), or by wrapping a transport directly (tests/inprocess.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipemlaan.engine.comm import Comm

ENV = "PIPEMLAAN_RECORD_COMM"


class RecordingComm(Comm):
    def __init__(self, inner: Comm, path: Path):
        self.inner, self.rank, self.world = inner, inner.rank, inner.world
        self.timeout_s = inner.timeout_s
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "w", buffering=1)      # a line per event, kept if the rank dies
        self._action: str | None = None

    def _log(self, call: str, **what) -> None:
        self._f.write(json.dumps({"call": call, "in": self._action, **what}) + "\n")

    def doing(self, action) -> None:
        self._action = None if action is None else str(action)
        if action is not None:
            self._f.write(json.dumps({"action": self._action}) + "\n")

    def close(self) -> None:
        self._f.close()

    def create_groups(self, groups):
        self._log("create_groups", groups=sorted(groups))
        self.inner.create_groups(groups)

    def post(self, ops):
        self._log("post", ops=[[send, peer, group, list(t.shape)] for send, t, peer, group
                               in ops])
        return self.inner.post(ops)

    def wait(self, work, peer, what):
        self._log("wait", peer=peer)
        self.inner.wait(work, peer, what)

    def all_reduce(self, tensor, group, what):
        self._log("all_reduce", group=group)
        self.inner.all_reduce(tensor, group, what)

    def start_all_reduce(self, tensor, group):
        self._log("start_all_reduce", group=group)
        return self.inner.start_all_reduce(tensor, group)

    def all_gather_object(self, obj):
        self._log("all_gather_object")
        return self.inner.all_gather_object(obj)

    def broadcast_object(self, obj, src=0):
        self._log("broadcast_object", src=src)
        return self.inner.broadcast_object(obj, src)

    def barrier(self):
        self._log("barrier")
        self.inner.barrier()


def maybe_record(comm: Comm) -> Comm:
    """`comm` wrapped in a recorder when PIPEMLAAN_RECORD_COMM names a folder."""
    folder = os.environ.get(ENV)
    if not folder:
        return comm
    return RecordingComm(comm, Path(folder) / f"rank{comm.rank}.jsonl")
