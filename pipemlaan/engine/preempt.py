"""Stopping a run that a cluster preempts, without losing its work.

SLURM sends SIGTERM at the time limit or on preemption (and, when asked, a warning signal such
as SIGUSR1 some seconds before); torchrun forwards SIGTERM to its workers and kills them
`--shutdown-timeout` seconds later (30 by default); Kubernetes sends SIGTERM, then SIGKILL after
its grace period. On SIGTERM or SIGUSR1 a rank only raises its `StopRequest`; the ranks then
agree on a common step through the schedule's stop rounds (engine/schedule.py [Note: stop
agreement]), every rank finishes that step, rank 0 writes a checkpoint there, and the process
exits with status 75 (EX_TEMPFAIL: "try again"), printing how to resume. A second signal while
stopping changes nothing (the checkpoint is on its way); SIGKILL aborts without one.

The handlers are installed by the entry point (pipemlaan/train.py): Python runs signal handlers
in the main thread only, and in-process test runs (threads) set their `StopRequest` directly.
"""

from __future__ import annotations

import signal
import sys

PREEMPTED_EXIT = 75       # sysexits.h EX_TEMPFAIL
SIGNALS = ("SIGTERM", "SIGUSR1")


class StopRequest:
    """Whether this rank was asked to stop, and by what. `at_step`: where the ranks agreed to
    stop (set by the trainer)."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.at_step: int | None = None

    def set(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    @property
    def requested(self) -> bool:
        return self.reason is not None


def install(request: StopRequest, rank: int):
    """SIGTERM and SIGUSR1 raise `request` instead of ending the process. Returns a function
    that puts the previous handlers back."""
    def handler(signum, _frame) -> None:
        name = signal.Signals(signum).name
        again = request.requested
        request.set(name)
        if rank == 0:
            # one write per line, as train.py's errors: ranks share the terminal
            sys.stderr.write(
                (f"pipemlaan: {name} again: still stopping at the agreed step; SIGKILL "
                 f"aborts without a checkpoint\n" if again else
                 f"pipemlaan: {name}: every rank stops at an agreed step, with a "
                 f"checkpoint there\n"))
            sys.stderr.flush()
    before = {name: signal.signal(getattr(signal, name), handler) for name in SIGNALS}

    def restore() -> None:
        for name, h in before.items():
            signal.signal(getattr(signal, name), h)
    return restore
