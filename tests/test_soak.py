"""Soak: many short 4-rank CPU runs under torchrun back to back; none hangs, fails or leaves a
process behind.

Run:
  cd /work/main && OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_soak.py -q --durations=10
  (PIPEMLAAN_SOAK_RUNS=20 for the long soak, as `make soak` does; the default 1 keeps CI fast)

Each run is async, tiny, `--train.max_steps=4`, `--run.log_every=1`, with a 60 s timeout; every
run carries one unique marker in its run name, so `pgrep -f` finds any process a run left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid


from launching import REPO, TORCHRUN, launch_env

RUNS = int(os.environ.get("PIPEMLAAN_SOAK_RUNS", "1"))
RANKS = 4
RUN_TIMEOUT_S = 60
MAX_STEPS = 4
ARGS = ["--data.name=synthetic", "--data.synthetic_size=256", "--data.synthetic_image=[1,16,16]",
        "--model.name=resnet8", "--model.K=4",
        "--method.first_modules_head=true", "--method.heads=compact",
        "--train.batch_size=16", "--run.progress=false",
        "--pipeline.timeout_s=30", "--train.device=cpu", "--pipeline.mode=async",
        f"--train.max_steps={MAX_STEPS}", "--run.log_every=1"]


def marked(marker: str) -> list[int]:
    res = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True, timeout=30)
    return [int(p) for p in res.stdout.split()]


def kill_marked(marker: str) -> None:
    """SIGKILL every process carrying `marker` (only this test's runs carry it), with the
    process group it leads (torchrun and each of its workers lead their own)."""
    for pid in marked(marker):
        try:
            if os.getpgid(pid) == pid and pid != os.getpgrp():
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def test_soak_many_short_4_rank_runs(tmp_path):
    assert RUNS >= 1, "PIPEMLAAN_SOAK_RUNS must be at least 1"
    marker = f"soak-{uuid.uuid4().hex[:10]}"
    failures, seconds = [], []
    try:
        for i in range(RUNS):
            name = f"{marker}-{i:03d}"
            cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={RANKS}",
                   "--monitor-interval=0.5", "-m", "pipemlaan.train", *ARGS,
                   f"--run.dir={tmp_path / 'runs'}", f"--run.name={name}"]
            log = tmp_path / f"{name}.log"
            t0 = time.monotonic()
            with open(log, "w") as out:
                proc = subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
                left = []
                try:
                    rc = proc.wait(timeout=RUN_TIMEOUT_S)
                    # torchrun has exited: none of the run's workers may outlive it
                    deadline = time.monotonic() + 10
                    left = marked(name)
                    while left and time.monotonic() < deadline:
                        time.sleep(0.5)
                        left = marked(name)
                except subprocess.TimeoutExpired:
                    rc = None
                finally:
                    # torchrun's group, then whatever of this run is left (its workers run in
                    # sessions of their own, so they would outlive a killed torchrun)
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    kill_marked(name)
                    proc.wait(timeout=30)
            seconds.append(time.monotonic() - t0)
            run_dir = tmp_path / "runs" / name
            summary = run_dir / "summary.json"
            problem = None
            if rc is None:
                problem = f"hung: still running after {RUN_TIMEOUT_S} s"
            elif left:
                problem = f"processes left behind after torchrun exited: {left}"
            elif rc != 0:
                problem = f"exit status {rc}"
            elif not summary.is_file():
                problem = "no summary.json"
            else:
                s = json.loads(summary.read_text())
                if s.get("world_size") != RANKS or s.get("steps") != MAX_STEPS:
                    problem = (f"summary.json has world_size {s.get('world_size')}, steps "
                               f"{s.get('steps')}")
            if problem:
                failures.append(f"run {i}: {problem}\n{log.read_text()[-4000:]}")
        assert not marked(marker), "processes of the soak runs remain"
        assert not failures, (f"{len(failures)} of {RUNS} runs failed:\n"
                              + "\n\n".join(failures))
        print(f"{RUNS} runs, {min(seconds):.1f}-{max(seconds):.1f} s each")
    finally:
        kill_marked(marker)
