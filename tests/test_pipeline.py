"""End-to-end tests of the distributed pipeline as real processes: `python -m pipemlaan.train`
alone and under `torchrun` (gloo on CPU, one pipeline stage per rank) on tiny synthetic runs.

The equalities of the pipeline for every method, rank count, window, LAM interval, replica
layout and resume are checked in one process, one thread per rank (test_inprocess.py: the same
trainer, the same action lists, an in-memory transport). What stays here is what only separate
processes show: the rendezvous, gloo's point-to-point and all-reduce, start-up errors across
processes, exit codes; and that a torchrun launch trains exactly as the in-process run does.

- a lockstep pipeline (dgl+mlaan, 2 ranks) equals the single process: per-step losses of every
  module, every tensor of the final checkpoints, evaluation results;
- an async pipeline (4 ranks, LAM across ranks) trains: losses fall, the test error is far below
  chance, summary.json describes every rank; twins follow live blocks on other ranks (gloo's
  irecv once never completed before a wait, which left every twin at its initial weights);
- a torchrun launch and the in-process run of the same config give the same weights, bit for
  bit (lockstep 2 ranks, async 4 ranks): the in-process checks stand for torchrun launches;
- per-rank metrics lines (lockstep 2 ranks, async 4 ranks), with gloo's real waits;
- data-parallel replicas over gloo (D=2 x S=2, lockstep, sync_bn) equal the single process at
  the same global batch (the in-process single run), and the replicas really split the batch;
- start-up failures are named errors, not hangs: a rank with a different config (a world that
  pipeline.replicas does not divide: test_config_cli.py; a world larger than model.K:
  test_faults.py's start-up cases);
- every launch that should succeed exits 0 on every rank.

Run:
  cd /work/main && OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_pipeline.py -q --durations=10

Every launch is a subprocess with a timeout (a hang fails the test). The launches a module's
selected tests need are started up front by a small pool (2 at a time on 2 cores;
PIPEMLAAN_TEST_JOBS overrides) and cached, so each runs once and serves every test that reads
it. The in-process runs these launches are compared with come from the session's cache
(conftest.py `inprocess_runs`: the runs test_inprocess.py made, or made here when it did not
run). The tiny configs and the checks are shared with test_inprocess.py (runs.py).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import textwrap
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest

from pipemlaan.engine.call_log import ENV as RECORD_ENV

from launching import REPO, launch_env, train_command
from recorded import check_run, expected_programs, summary_partition
from timelines import check_clock_offsets_on_one_host, check_tensorboard, check_timeline
from runs import (ASYNC_LAM, K, LOCKSTEP, MLAAN, TRAIN_RUNS, RunOutputs,
                  assert_params_identical, check_async_trains,
                  check_evaluation_equals_single_process, check_lockstep_equals_single_process,
                  check_per_rank_metrics, check_replicas_equal_single_process,
                  check_replicas_split_the_batch, check_twins_follow_live_blocks, needed_runs,
                  needs)

RUN_TIMEOUT_S = 300          # any single launch; a hang fails the test instead of CI
FAIL_TIMEOUT_S = 150         # launches that must fail fast
ABORT_MARK = "terminate called"   # libstdc++'s std::terminate message: a rank died of SIGABRT


# ---- launching -----------------------------------------------------------------------------
@dataclass
class Result(RunOutputs):
    key: str
    cmd: list[str]
    returncode: int | None       # None: killed by the timeout
    stdout: str
    stderr: str
    run_dir: Path
    seconds: float
    phases: list["Result"] = field(default_factory=list)
    notes: dict = field(default_factory=dict)

    def describe(self) -> str:
        rc = "timed out" if self.returncode is None else f"exit {self.returncode}"
        return (f"[{self.key}] {rc} after {self.seconds:.1f} s\n$ {' '.join(self.cmd)}\n"
                f"--- stdout (tail) ---\n{self.stdout[-3000:]}\n"
                f"--- stderr (tail) ---\n{self.stderr[-6000:]}")

    def aborted_at_exit(self) -> bool:
        """A rank died of SIGABRT ("terminate called without an active exception") after the
        run finished: summary.json is written and no rank reported an error. That is the
        shutdown race test_every_rank_exits_cleanly is about; the other tests still check what
        the run produced."""
        if "aborted_at_exit" in self.notes:      # decided when the run ended
            return self.notes["aborted_at_exit"]
        return (self.returncode not in (0, None) and ABORT_MARK in self.stderr
                and "pipemlaan: error:" not in self.stderr
                and (self.run_dir / "summary.json").is_file())

    def check(self) -> "Result":
        """The run finished and wrote its outputs (see aborted_at_exit for the one tolerated
        exit failure, which test_every_rank_exits_cleanly reports)."""
        for p in self.phases:
            p.check()
        assert self.returncode == 0 or self.aborted_at_exit(), self.describe()
        return self


def launch(key: str, ranks: int, args: list[str], run_root: Path, *, timeout: float,
           script: Path | None = None) -> Result:
    """Runs one training launch (torchrun when ranks > 1); never raises on failure or hang."""
    # torchrun --standalone: a fresh rendezvous on a free port, so launches never collide
    cmd = train_command(ranks, [*args, f"--run.dir={run_root}", "--run.name=run"],
                        program=[str(script)] if script else None,
                        torchrun_args=("--monitor-interval=0.5",))
    t0 = time.monotonic()
    env = launch_env(**({RECORD_ENV: str(run_root / "record")} if key in RECORDED else {}))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)   # torchrun and every worker it started
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        rc = None
    seconds = time.monotonic() - t0
    # keep the launch's output next to the run, for post-mortems of a failed test
    run_root.mkdir(parents=True, exist_ok=True)
    log = run_root / f"launch-{key.replace('/', '-')}.log"
    log.write_text(f"$ {' '.join(cmd)}\nexit {rc} after {seconds:.1f} s\n--- stdout ---\n{out}"
                   f"\n--- stderr ---\n{err}")
    return Result(key, cmd, rc, out, err, run_root / "run", seconds)


# ---- the jobs (every run any test needs, by key) -------------------------------------------
def _train_job(ranks: int, args: list[str], key: str, root: Path,
               timeout: float = RUN_TIMEOUT_S) -> Result:
    return launch(key, ranks, args, root / key, timeout=timeout)


HANDSHAKE_WRAPPER = textwrap.dedent("""\
    # torchrun runs this on every rank: rank 1 alone gets one extra override.
    import os
    import sys

    from pipemlaan.train import main

    argv = sys.argv[1:]
    if os.environ.get("RANK") == "1":
        argv.append("--model.width=8")
    sys.exit(main(argv))
""")


def _handshake_job(key: str, root: Path) -> Result:
    (root / key).mkdir(parents=True)
    script = root / key / "wrapper.py"
    script.write_text(HANDSHAKE_WRAPPER)
    return launch(key, 2, [*LOCKSTEP, *MLAAN, "--pipeline.timeout_s=30"], root / key / "runs",
                  timeout=FAIL_TIMEOUT_S, script=script)


# launches whose every call between ranks is recorded (engine/call_log.py) and checked against
# the schedule (tests/recorded.py, test_order.py for the in-process cases)
RECORDED = {"async-lam-4"}

# the torchrun launches that stay (runs.py TRAIN_RUNS has every config by key)
# (the single-process reference is the in-process run: a world of one rank, no transport)
LAUNCHED = ["lock-dgl+mlaan-2", "async-lam-4", "dp-2x2-dgl+mlaan"]
JOBS = {key: partial(_train_job, *TRAIN_RUNS[key]) for key in LAUNCHED}
JOBS["handshake"] = _handshake_job


class Runner:
    """Runs jobs on a small pool, each once; tests wait for the results they need."""

    def __init__(self, root: Path, jobs: int):
        self.root = root
        self.pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="pipemlaan-run")
        self.futures: dict[str, Future] = {}

    def submit(self, key: str) -> None:
        if key not in self.futures:
            self.futures[key] = self.pool.submit(JOBS[key], key=key, root=self.root)

    def get(self, key: str) -> Result:
        self.submit(key)
        return self.futures[key].result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _pool_size() -> int:
    if os.environ.get("PIPEMLAAN_TEST_JOBS"):
        return max(1, int(os.environ["PIPEMLAAN_TEST_JOBS"]))
    return max(2, min(4, (os.cpu_count() or 2) // 2 + 1))


@pytest.fixture(scope="module")
def runner(request, tmp_path_factory):
    r = Runner(tmp_path_factory.mktemp("pipeline-runs"), _pool_size())
    for key in needed_runs(request):     # every run the selected tests need, in test order
        r.submit(key)
    yield r
    r.close()


# a traceback frame inside the package: some rank crashed instead of printing one error line
PIPEMLAAN_TRACEBACK = re.compile(r'File "' + re.escape(str(REPO / "pipemlaan")))


def failed_cleanly(res: Result) -> list[str]:
    """Asserts the launch failed (non-zero, not by the test's timeout) without a rank crashing
    in a traceback; returns its error lines."""
    assert res.returncode is not None, f"hung until the test timeout\n{res.describe()}"
    assert res.returncode != 0, res.describe()
    assert not PIPEMLAAN_TRACEBACK.search(res.stderr), "a rank crashed with a traceback"
    return error_lines(res)


def error_lines(res: Result) -> list[str]:
    """The `pipemlaan: error: ...` messages on stderr. Ranks write to one pipe, and with
    PYTHONUNBUFFERED a message and its newline are separate writes, so two ranks' messages can
    share a line: split on the prefix too."""
    return [m.strip() for m in re.findall(r"pipemlaan: error: (.*?)(?=pipemlaan: error:|\n|$)",
                                          res.stderr)]


# ---- lockstep equivalence ------------------------------------------------------------------
# every method, 2, 3 and 4 ranks, window 3, LAM sync interval: test_inprocess.py
@needs(lambda: ["lock-dgl+mlaan-2"])
def test_lockstep_equals_single_process(runner, inprocess_runs):
    ref = inprocess_runs.get("ref-dgl+mlaan")
    got = runner.get("lock-dgl+mlaan-2").check()
    check_lockstep_equals_single_process(ref, got, 2, "dgl+mlaan")


@needs(lambda: ["lock-dgl+mlaan-2"])
def test_lockstep_evaluation_equals_single_process(runner, inprocess_runs):
    check_evaluation_equals_single_process(inprocess_runs.get("ref-dgl+mlaan"),
                                           runner.get("lock-dgl+mlaan-2").check())


# ---- async mode ----------------------------------------------------------------------------
# 2 and 4 ranks with 2 and 3 microbatches, activations in flight, timing: test_inprocess.py
@needs(lambda: ["async-lam-4"])
def test_async_pipeline_trains(runner):
    check_async_trains(runner.get("async-lam-4").check(), 4)


@needs(lambda: ["async-lam-4"])
def test_async_twins_follow_live_blocks_on_other_ranks(runner):
    """Every twin's live block sits on a later rank here. In async mode the owners' snapshots
    must reach the twin (they once never did: gloo's irecv never reports completion before it
    is waited on, so polling for arrived snapshots left every twin at its initial weights)."""
    check_twins_follow_live_blocks(runner.get("async-lam-4").check(), ASYNC_LAM)


@needs(lambda: ["async-lam-4"])
def test_torchrun_launch_follows_its_schedule(runner):
    """Four processes over gloo, recorded: start-up, async steps with LAM across every rank,
    evaluation, checkpoints, the stop rounds, the summary and the barrier at exit, each rank's
    calls exactly its `schedule.program`."""
    res = runner.get("async-lam-4").check()
    ranks, args = TRAIN_RUNS["async-lam-4"]
    check_run(res.run_dir.parent / "record",
              expected_programs(args, ranks, summary_partition(res.run_dir)))


@pytest.mark.parametrize("key", ["lock-dgl+mlaan-2", "async-lam-4"])
@needs(lambda key: [key])
def test_torchrun_launch_equals_in_process_run(runner, inprocess_runs, key):
    """The same config with a process per rank (gloo) and with a thread per rank (in-memory
    transport, the run test_inprocess.py made of it) gives the same weights bit for bit, the
    same losses and the same evaluation: what test_inprocess.py checks in one process holds for
    torchrun launches. For the async run it is also a check that async training does not
    depend on timing (threads and processes deliver messages in very different orders)."""
    launched = runner.get(key).check()
    threaded = inprocess_runs.get(key)
    assert_params_identical(launched, threaded, K)
    assert launched.losses() == threaded.losses()


# ---- per-rank metrics ----------------------------------------------------------------------
# also lockstep 4 ranks and async 2 ranks: test_inprocess.py
METRIC_RUNS = {"lockstep-2ranks": "lock-dgl+mlaan-2", "async-4ranks": "async-lam-4"}


@pytest.mark.parametrize("run", list(METRIC_RUNS))
@needs(lambda run: [METRIC_RUNS[run]])
def test_per_rank_metrics(runner, run):
    check_per_rank_metrics(runner.get(METRIC_RUNS[run]).check())


# ---- what a run leaves for its dashboards: the timeline, TensorBoard ----------------------
# in one process too: test_timeline.py, test_trackers.py
@pytest.mark.parametrize("run", list(METRIC_RUNS))
@needs(lambda run: [METRIC_RUNS[run]])
def test_one_timeline_of_every_rank(runner, run, tmp_path):
    """Processes on one host: every rank's row, spans that never overlap, every receive after
    its send on the clock offsets measured at start-up (0 to within their uncertainty here)."""
    res = runner.get(METRIC_RUNS[run]).check()
    world = res.summary()["world_size"]
    check_clock_offsets_on_one_host(res.run_dir)
    check_timeline(res.run_dir, world, tmp_path, (0, res.summary()["steps"]))


@pytest.mark.parametrize("run", list(METRIC_RUNS))
@needs(lambda run: [METRIC_RUNS[run]])
def test_tensorboard_event_files_read_back(runner, run):
    res = runner.get(METRIC_RUNS[run]).check()
    check_tensorboard(res.run_dir, res.summary()["world_size"])


# ---- start-up failures: named errors, not hangs --------------------------------------------
@needs(lambda: ["handshake"])
def test_handshake_rejects_rank_with_different_config(runner):
    res = runner.get("handshake")
    errors = failed_cleanly(res)
    assert any("different configuration" in e or "shape" in e for e in errors), res.describe()
    assert not (res.run_dir / "summary.json").exists()


# ---- data-parallel replicas ----------------------------------------------------------------
# D=2 x S=1, infopro+mlaan, BP replicas, replica checkpoints, async replicas: test_inprocess.py
@needs(lambda: ["dp-2x2-dgl+mlaan"])
def test_replicas_lockstep_equal_single_process_at_same_global_batch(runner, inprocess_runs):
    """Gloo's all-reduce within each stage's replica group (gradients, sync_bn statistics). The
    single-process reference is the in-process one (a world of one rank, no transport), which
    test_inprocess.py compares with the in-process replicas too."""
    check_replicas_equal_single_process(inprocess_runs.get("ref-lr002-dgl+mlaan"),
                                        runner.get("dp-2x2-dgl+mlaan").check(), "2x2")


@needs(lambda: ["dp-2x2-dgl+mlaan"])
def test_replicas_really_split_the_batch(runner):
    """Negative control for the equality above: each replica's own loss is over a different
    half of the batch, so the per-replica losses differ from each other and from the mean."""
    check_replicas_split_the_batch(runner.get("dp-2x2-dgl+mlaan").check())


# ---- clean shutdown ------------------------------------------------------------------------
EXPECTED_FAILURES = {"handshake"}


@needs(lambda: [k for k in JOBS if k not in EXPECTED_FAILURES])
def test_every_rank_exits_cleanly(runner):
    """Every launch of this module that should succeed exits 0 on every rank: none of them
    finished its work and then died at interpreter exit (SIGABRT, "terminate called without
    an active exception"), which makes torchrun report the whole run as failed."""
    bad = []
    for key, fut in list(runner.futures.items()):
        if key in EXPECTED_FAILURES:
            continue
        res = fut.result()
        for r in [*res.phases, res]:
            if r.returncode != 0 or ABORT_MARK in r.stderr:
                lines = [ln for ln in r.stderr.splitlines()
                         if ABORT_MARK in ln or "exitcode" in ln or "pipemlaan: error" in ln]
                bad.append(f"{r.key}: exit {r.returncode}: " + " | ".join(lines[:6]))
    assert not bad, "launches that did not exit cleanly:\n" + "\n".join(bad)
