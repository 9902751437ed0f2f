"""Preemption: a SIGTERM (or SIGUSR1) stops every rank at an agreed step with a checkpoint, and
the resumed run ends with the weights of an uninterrupted one.

- in one process, a thread per rank, a rank asked to stop before the first step (as a signal
  would): a lockstep pipeline resumes bit for bit to the uninterrupted run; an async 4-rank
  pipeline with LAM across ranks resumes bit for bit to the uninterrupted run with the same
  drain at the stop step (run.checkpoint_steps there): the in-flight window gradients are
  applied at the stop, and the LAM snapshots the resumed steps take come from the owners'
  history (engine/lam.py [Note: LAM history]);
- real signals in one process: SIGTERM during an evaluation (the evaluation finishes, the run
  stops at the next agreed step) and during a checkpoint write (the checkpoint is whole);
- under torchrun, 4 CPU ranks, async: SIGTERM to torchrun in the middle of an epoch, then a
  second SIGTERM while stopping; every worker stops by itself within 60 s (status 75, none
  killed), with a checkpoint at the agreed step marked preempted; resumed from it, the final
  param_checksum equals the uninterrupted run's (with its drain at that step).

Run: .venv/bin/python -m pytest tests/test_preempt.py -q
"""

from __future__ import annotations

import json
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pipemlaan.config import load_config
from pipemlaan.engine import preempt
from pipemlaan.engine.distributed import DistEnv
from pipemlaan.engine.trainer import Trainer

from inprocess import run_ranks
from launching import (_env, complete_checkpoints, launched, marked, train_cmd, train_ranks,
                       unique_name, wait_until)
from runs import (ASYNC_LAM, ASYNC_STEPS, K, LOCKSTEP, LOCK_STEPS, MLAAN, TINY,
                  RunOutputs, assert_params_identical)

STOP_EXIT_S = 60


@dataclass
class Folder(RunOutputs):
    key: str
    run_dir: Path


def _meta(run_dir: Path) -> dict:
    return json.loads((complete_checkpoints(run_dir)[-1] / "meta.json").read_text())


# ---- in one process, a thread per rank -------------------------------------------------------
def test_stopped_lockstep_pipeline_resumes_bit_for_bit(tmp_path):
    args = [*LOCKSTEP, *MLAAN, "--pipeline.partition=[2,2]", f"--run.dir={tmp_path}"]
    run_ranks([*args, "--run.name=whole"], 2)
    stopped = [*args, "--run.name=stopped"]
    res = run_ranks(stopped, 2, stop_ranks=(1,))
    at = res["stopped_at"]
    assert at == 1 + 4 + 1 and res["summary"] is None       # 1 + D + L: 2 stages, lockstep
    meta = _meta(tmp_path / "stopped")
    assert meta["step"] == at and meta["preempted"] is True
    assert [r for r in res["metrics"] if r["kind"] == "preempted"][0]["step"] == at
    run_ranks([*stopped, "--run.resume=true"], 2)
    assert_params_identical(Folder("whole", tmp_path / "whole"),
                            Folder("stopped+resumed", tmp_path / "stopped"), K)
    assert json.loads((tmp_path / "stopped" / "summary.json").read_text())["steps"] == LOCK_STEPS


def test_stopped_async_pipeline_resumes_to_the_run_drained_there(tmp_path):
    """4 ranks, 2 batches in flight, every twin following a block two or three ranks down:
    the resumed run's first steps take the snapshots published before the stop, which only
    the owners' history still holds."""
    at = 1 + (2 * 2 * 3 + 2) + 2                     # 1 + D + L: 4 stages, M = 2
    assert ASYNC_STEPS // 2 < at < ASYNC_STEPS       # mid-epoch, and one drain in the reference
    args = [*ASYNC_LAM, f"--run.dir={tmp_path}"]
    run_ranks([*args, "--run.name=whole", f"--run.checkpoint_steps={at}"], 4)
    stopped = [*args, "--run.name=stopped"]
    assert run_ranks(stopped, 4, stop_ranks=(3,))["stopped_at"] == at
    run_ranks([*stopped, "--run.resume=true"], 4)
    assert_params_identical(Folder("whole", tmp_path / "whole"),
                            Folder("stopped+resumed", tmp_path / "stopped"), K)


# ---- real signals in one process -----------------------------------------------------------
SINGLE = [*TINY, "--data.synthetic_size=128", "--train.epochs=2", *MLAAN]
SINGLE_STEPS = 2 * 128 // 16


def _train_signalled(tmp_path: Path, name: str, monkeypatch, where: str) -> Trainer:
    """A single-process run in this (the main) thread with the entry point's handlers, which
    sends itself SIGTERM the first time `where` is reached."""
    import pipemlaan.engine.checkpoint_state as checkpoint_state
    import pipemlaan.engine.stage as stage_mod
    target = {"eval": (stage_mod.Stage, "eval_batch"),
              "checkpoint": (checkpoint_state.ckpt, "save_module_file")}[where]
    real = getattr(*target)
    fired = []

    def signalling(*a, **kw):
        if not fired:
            fired.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **kw)
    monkeypatch.setattr(*target, signalling)
    stop = preempt.StopRequest()
    restore = preempt.install(stop, 0)
    try:
        cfg = load_config(None, [*SINGLE, f"--run.dir={tmp_path}", f"--run.name={name}"])
        trainer = Trainer(cfg, DistEnv(0, 1, 0, torch.device("cpu"), None), stop)
        try:
            trainer.train()
        finally:
            trainer.close()
    finally:
        restore()
    assert fired and stop.reason == "SIGTERM"
    return trainer


@pytest.mark.parametrize("where", ["eval", "checkpoint"])
def test_sigterm_during_evaluation_or_checkpoint_write(tmp_path, monkeypatch, where):
    trainer = _train_signalled(tmp_path, "signalled", monkeypatch, where)
    run_dir = tmp_path / "signalled"
    assert trainer.preempted
    steps_per_epoch = SINGLE_STEPS // 2
    # one process: D = 2, L = 0; the first stop round after the signal is at step 9
    assert trainer.step == steps_per_epoch + 1 + 2
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [x["step"] for x in lines if x["kind"] == "eval"]
    assert evals == [steps_per_epoch], "the interrupted evaluation must finish and be logged"
    done = [p.name for p in complete_checkpoints(run_dir)]
    assert done == [f"step_{steps_per_epoch:08d}", f"step_{trainer.step:08d}"], done
    cfg = load_config(None, [*SINGLE, f"--run.dir={tmp_path}", "--run.name=signalled",
                             "--run.resume=true"])
    resumed = Trainer(cfg, DistEnv(0, 1, 0, torch.device("cpu"), None))
    try:
        out = resumed.train()
    finally:
        resumed.close()
    cfg = load_config(None, [*SINGLE, f"--run.dir={tmp_path}", "--run.name=whole"])
    whole = Trainer(cfg, DistEnv(0, 1, 0, torch.device("cpu"), None))
    try:
        ref = whole.train()
    finally:
        whole.close()
    assert out["param_checksum"] == ref["param_checksum"]


# ---- under torchrun --------------------------------------------------------------------------
TORCHRUN_RUN = [*ASYNC_LAM, "--data.synthetic_size=512", "--run.log_every=1",
                "--pipeline.timeout_s=60"]
TORCHRUN_STEPS = 2 * 512 // 16


def test_sigterm_to_torchrun_stops_every_rank_at_an_agreed_step(tmp_path):
    name = unique_name("preempt")
    run_dir = tmp_path / "runs" / name
    args = [*TORCHRUN_RUN, f"--run.dir={tmp_path / 'runs'}", f"--run.name={name}"]
    metrics = run_dir / "metrics.jsonl"

    def last_rank_step() -> int:
        if not metrics.is_file():
            return 0
        steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()
                 if x.endswith("}") and '"rank": 3' in x and '"train"' in x]
        return max(steps, default=0)

    with launched([(train_cmd(4, args), tmp_path / "torchrun", _env())], name) as (proc,):
        # mid-epoch 2, late enough that the reference run drains only at the stop
        wait_until(lambda: last_rank_step() >= TORCHRUN_STEPS // 2 + 2, 200, [proc],
                   "the last rank in epoch 2", every=0.02)
        proc.remember_workers()
        os.kill(proc.pid, signal.SIGTERM)
        wait_until(lambda: "every rank stops" in proc.stdout, 30, [proc], "a stop agreed",
                   every=0.05)
        os.kill(proc.pid, signal.SIGTERM)         # a second signal while stopping
        proc.wait(STOP_EXIT_S)
        # torchrun gives up waiting on a second signal; its workers finish stopping alone
        wait_until(lambda: not marked(name), STOP_EXIT_S, [], "every worker gone")
        err, described = proc.stderr, proc.describe()
    assert train_ranks(metrics) == {0, 1, 2, 3}
    meta = _meta(run_dir)
    at = meta["step"]
    assert meta["preempted"] is True and TORCHRUN_STEPS // 2 < at < TORCHRUN_STEPS, described
    assert not (run_dir / "summary.json").exists()
    assert re.search(rf"preempted \(SIGTERM\) when {at} steps were done", err), described
    assert "SIGTERM again" in err, described
    # no worker had to be killed: each one stopped by itself (status 75)
    assert "forcefully exiting" not in err, described

    # resumed in one process, a thread per rank (the same weights as a torchrun launch:
    # test_pipeline.py), from the checkpoint the torchrun job wrote
    run_ranks([*args, "--run.resume=true"], 4)
    got = json.loads((run_dir / "summary.json").read_text())
    assert got["steps"] == TORCHRUN_STEPS
    # the uninterrupted run with the same drain (in one process: bit-equal to torchrun)
    ref_args = [*TORCHRUN_RUN, f"--run.checkpoint_steps={at}", f"--run.dir={tmp_path}",
                "--run.name=whole"]
    ref = run_ranks(ref_args, 4)["summary"]
    assert got["param_checksum"] == ref["param_checksum"], (got["param_checksum"],
                                                            ref["param_checksum"])
