"""Runs a whole pipeline in this process: one thread per rank, the in-memory transport
(engine/comm.py LocalComm), the same trainer and action lists as a torchrun launch.

Not a test module; imported by the tests that compare pipelines with the single process
without starting a Python process per rank (test_inprocess.py). What only separate processes
can show (rendezvous, a dead rank, restarts, multi-node, exit codes) stays on torchrun.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from pipemlaan.config import load_config
from pipemlaan.engine.comm import HostStagedComm, LocalComm, LocalWorld
from pipemlaan.engine.distributed import DistEnv
from pipemlaan.engine.preempt import StopRequest
from pipemlaan.engine.call_log import RecordingComm
from pipemlaan.metrics import read_metrics


def run_ranks(overrides: list[str], world: int, timeout_s: float = 120.0,
              host_staged: bool = False, record_dir: Path | None = None,
              stop_ranks: tuple[int, ...] = ()) -> dict:
    """Trains with `world` ranks (`host_staged`: every tensor exchanged goes through a host
    buffer, as on ranks that share a GPU: engine/comm.py HostStagedComm); returns
    {"summary": rank 0's summary, "metrics": every metrics.jsonl record, "run_dir": the run
    folder, "stopped_at": where a stop was agreed, or None}. `record_dir`: every rank's calls
    to the others are recorded there (engine/call_log.py). `stop_ranks`: these ranks were asked
    to stop before the run began, as a SIGTERM would (engine/preempt.py). A rank's exception is
    re-raised (the first one that is not a consequence of another rank's failure)."""
    shared = LocalWorld(world, timeout_s)
    results: list = [None] * world
    errors: list = [None] * world
    stopped: list = [None] * world
    cfg0 = load_config(None, overrides)

    def worker(rank: int) -> None:
        from pipemlaan.engine.trainer import Trainer
        try:
            cfg = load_config(None, overrides)
            comm = LocalComm(shared, rank) if world > 1 else None
            if comm is not None and host_staged:
                comm = HostStagedComm(comm, stage_all=True)
            if comm is not None and record_dir is not None:
                comm = RecordingComm(comm, Path(record_dir) / f"rank{rank}.jsonl")
            env = DistEnv(rank, world, rank, torch.device("cpu"),
                          "local" if world > 1 else None, comm)
            stop = StopRequest()
            if rank in stop_ranks:
                stop.set("a test")
            trainer = Trainer(cfg, env, stop)
            try:
                results[rank] = trainer.train()
                stopped[rank] = stop.at_step
            finally:
                trainer.close()
                if isinstance(comm, RecordingComm):
                    comm.close()
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            errors[rank] = e
            shared.fail(f"rank {rank} raised {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s * 4)
        if t.is_alive():
            shared.fail("test timeout")
            raise TimeoutError(f"a rank did not finish within {timeout_s * 4:.0f} s")
    failed = [e for e in errors if e is not None]
    if failed:
        first = next((e for e in failed if "raised" not in str(e)), failed[0])
        raise first
    run_dir = Path(cfg0.run_dir)
    assert len(set(stopped)) == 1, f"the ranks stopped at different steps: {stopped}"
    return {"summary": results[0], "metrics": read_metrics(run_dir / "metrics.jsonl"),
            "run_dir": run_dir, "stopped_at": stopped[0]}
