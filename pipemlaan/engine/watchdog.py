"""Heartbeats, so that a rank that loses a peer can say which rank died.

Every rank's daemon thread writes `pipemlaan/hb/<rank>` (a timestamp) into the rendezvous store
every `PERIOD` seconds. When a wait on a peer fails (connection closed, timeout), the rank reads
every heartbeat and names the ranks that went silent, instead of reporting a socket address.
If the store itself is gone, the rank that hosted it (rank 0, or torchrun's agent) is named.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import torch.distributed as dist

from pipemlaan.errors import PipelineError

PERIOD = 1.0
STALE = 4 * PERIOD

_state: dict = {}


def start(rank: int, world: int) -> None:
    store = dist.distributed_c10d._get_default_store()
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(PERIOD):
            try:
                store.set(f"pipemlaan/hb/{rank}", repr(time.time()))
            except Exception:   # the store is gone: the failure is reported by the main thread
                return

    store.set(f"pipemlaan/hb/{rank}", repr(time.time()))
    thread = threading.Thread(target=beat, name="pipemlaan-heartbeat", daemon=True)
    thread.start()
    _state.update(store=store, rank=rank, world=world, stop=stop, thread=thread)


def stop() -> None:
    """Stops and joins the heartbeat thread: it must not touch the store while the process
    group is being destroyed (a C++ thread torn down mid-call aborts the process at exit)."""
    if "stop" in _state:
        _state["stop"].set()
        _state["thread"].join(timeout=10)
    _state.clear()


def silent_ranks() -> str:
    """A phrase naming the ranks whose heartbeat stopped (or '' when none is known)."""
    if "store" not in _state:
        return ""
    time.sleep(STALE)   # let a dead rank's heartbeat go stale before judging
    store, now, dead = _state["store"], time.time(), []
    try:
        store.set_timeout(timedelta(seconds=5))
        for r in range(_state["world"]):
            if r == _state["rank"]:
                continue
            if not store.check([f"pipemlaan/hb/{r}"]):
                dead.append(r)
                continue
            if now - float(store.get(f"pipemlaan/hb/{r}").decode()) > STALE:
                dead.append(r)
    except Exception:
        return "the rendezvous store is unreachable: rank 0 (or torchrun's agent) died"
    if not dead:
        return ""
    return f"rank{'s' if len(dead) > 1 else ''} {', '.join(map(str, dead))} stopped " \
           f"(no heartbeat for {STALE:.0f} s)"


def peer_failure(rank: int, what: str, peer: int | None, error: Exception,
                 timeout_s: float | None = None):
    """The PipelineError for a failed wait: names the silent ranks if heartbeats tell."""
    timed_out = "time" in str(error).lower()
    culprit = silent_ranks()
    if not culprit:
        who = f"rank {peer}" if peer is not None else "a peer"
        culprit = (f"{who} stalled for more than {timeout_s:.0f} s (raise pipeline.timeout_s "
                   f"if it is just slow)" if timed_out and timeout_s else f"{who} died")
    return PipelineError(f"rank {rank}: {what} failed: {culprit}; see that rank's log")
