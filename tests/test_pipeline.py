"""End-to-end tests of the distributed pipeline: `python -m pipemlaan.train` alone and under
`torchrun` (gloo on CPU, one pipeline stage per rank) on tiny synthetic runs.

- lockstep pipelines (2, 3 and 4 ranks) equal the single-process run: per-step losses of every
  module, final parameters of every module, evaluation results; also with a cascade window of 3
  and with a LAM sync interval > 1;
- async pipelines (several microbatches in flight) train: losses fall, the test error is far
  below chance, summary.json describes every rank;
- per-rank metrics lines; checkpoint + resume on a different number of ranks;
- start-up failures are named errors, not hangs: a rank with a different config, a world larger
  than model.K;
- data-parallel replicas (pipeline.replicas=D, D x S ranks): in lockstep with sync_bn, D=2 x S=2
  and D=2 x S=1 equal the single process at the same global batch (losses averaged over the
  replicas, every parameter, every evaluation); a D x S checkpoint resumes in one process; async
  replicas train and stay identical; a world that D does not divide is a named error.

Run: cd /work/main && OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_pipeline.py -q --durations=10

Every run is a subprocess with a timeout (a hang fails the test). The runs a module's selected
tests need are started up front by a small pool (2 at a time on 2 cores; PIPEMLAAN_TEST_JOBS
overrides) and cached, so each single-process reference runs once and serves every
parametrization that compares against it.
"""

from __future__ import annotations

import json
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
import torch

from pipemlaan.config import load_config
from pipemlaan.data import dataset_spec
from pipemlaan.local.module import build_local_modules

from launching import PYTHON, REPO, TORCHRUN, launch_env

RUN_TIMEOUT_S = 300          # any single launch; a hang fails the test instead of CI
FAIL_TIMEOUT_S = 150         # launches that must fail fast
RTOL, ATOL = 1e-5, 1e-6
ABORT_MARK = "terminate called"   # libstdc++'s std::terminate message: a rank died of SIGABRT

# ---- the tiny runs -------------------------------------------------------------------------
K = 4
BATCH = 16
NUM_CLASSES = 10             # the synthetic dataset's classes
CHANCE_ERROR = 100.0 * (1 - 1 / NUM_CLASSES)
TINY = ["--data.name=synthetic", "--data.synthetic_image=[3,8,8]", "--model.name=resnet8",
        f"--model.K={K}", f"--train.batch_size={BATCH}", "--run.progress=false",
        "--run.log_every=1", "--train.device=cpu"]

LOCK_SAMPLES, LOCK_EPOCHS = 128, 2
LOCK_STEPS_PER_EPOCH = LOCK_SAMPLES // BATCH
LOCK_STEPS = LOCK_EPOCHS * LOCK_STEPS_PER_EPOCH
LOCKSTEP = TINY + [f"--data.synthetic_size={LOCK_SAMPLES}", f"--train.epochs={LOCK_EPOCHS}",
                   "--pipeline.mode=lockstep"]

ASYNC_SAMPLES, ASYNC_EPOCHS = 256, 2
ASYNC_STEPS = ASYNC_EPOCHS * (ASYNC_SAMPLES // BATCH)
ASYNC = TINY + [f"--data.synthetic_size={ASYNC_SAMPLES}", f"--train.epochs={ASYNC_EPOCHS}",
                "--pipeline.mode=async"]

METHODS = {
    "dgl": ["--method.name=dgl", "--method.mlm=false", "--method.lam=false"],
    "dgl+mlm": ["--method.name=dgl", "--method.mlm=true", "--method.lam=false"],
    "dgl+lam": ["--method.name=dgl", "--method.mlm=false", "--method.lam=true"],
    "dgl+mlaan": ["--method.name=dgl", "--method.mlm=true", "--method.lam=true"],
    "infopro+mlaan": ["--method.name=infopro", "--method.mlm=true", "--method.lam=true"],
}
MLAAN = METHODS["dgl+mlaan"]
BP = ["--method.name=bp", "--method.mlm=false", "--method.lam=false"]

WINDOW3_K = 6
WINDOW3 = [a for a in LOCKSTEP if not a.startswith(("--model.K=", "--model.name="))] + \
    ["--model.name=resnet14", f"--model.K={WINDOW3_K}", *MLAAN, "--method.window=3"]
WINDOW3_PARTITION = [2, 2, 2]

SYNC_EVERY = 3
ASYNC_CASES = [(2, 2), (2, 3), (4, 2), (4, 3)]


# ---- launching -----------------------------------------------------------------------------
@dataclass
class Result:
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

    # -- outputs of the run --
    def metrics(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        assert path.is_file(), f"{self.key}: no metrics.jsonl\n{self.describe()}"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def train_lines(self) -> list[dict]:
        return [r for r in self.metrics() if r.get("kind") == "train"]

    def losses(self) -> dict[tuple[int, int], float]:
        """(step, module) -> loss, from every rank's train lines; each pair logged once."""
        out: dict[tuple[int, int], float] = {}
        for r in self.train_lines():
            for k, v in r["losses"].items():
                key = (int(r["step"]), int(k))
                assert key not in out, f"{self.key}: step {key[0]} module {key[1]} logged twice"
                out[key] = float(v)
        return out

    def replica_mean_losses(self, replicas: int) -> dict[tuple[int, int], float]:
        """(step, module) -> the mean over replicas of each replica's loss on its slice: the
        loss of the whole global batch when the slices are equal."""
        per: dict[tuple[int, int], dict[int, float]] = {}
        for r in self.train_lines():
            for k, v in r["losses"].items():
                key = (int(r["step"]), int(k))
                got = per.setdefault(key, {})
                assert r["replica"] not in got, f"{self.key}: {key} logged twice by a replica"
                got[r["replica"]] = float(v)
        assert all(len(v) == replicas for v in per.values()), f"{self.key}: replicas missing"
        return {key: sum(v.values()) / replicas for key, v in per.items()}

    def summary(self) -> dict:
        path = self.run_dir / "summary.json"
        assert path.is_file(), f"{self.key}: no summary.json\n{self.describe()}"
        return json.loads(path.read_text())

    def final_checkpoint(self) -> Path:
        done = sorted(p for p in (self.run_dir / "checkpoints").glob("step_*")
                      if (p / "meta.json").is_file())
        assert done, f"{self.key}: no complete checkpoint in {self.run_dir}"
        return done[-1]

    def module_states(self, num_modules: int) -> dict[int, dict[str, torch.Tensor]]:
        d = self.final_checkpoint()
        out = {}
        for k in range(num_modules):
            state = torch.load(d / f"module_{k:03d}.pt", map_location="cpu", weights_only=True)
            out[k] = state["module"]
        return out


def launch(key: str, ranks: int, args: list[str], run_root: Path, *, timeout: float,
           script: Path | None = None) -> Result:
    """Runs one training launch (torchrun when ranks > 1); never raises on failure or hang."""
    program = [str(script)] if script else ["-m", "pipemlaan.train"]
    if ranks == 1:
        cmd = [PYTHON, *program]
    else:   # --standalone: a fresh rendezvous on a free port, so launches never collide
        cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={ranks}", "--monitor-interval=0.5",
               *program]
    cmd += [*args, f"--run.dir={run_root}", "--run.name=run"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE,
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


def _resume_job(key: str, root: Path) -> Result:
    """2 ranks stop after one epoch (train.max_steps); 4 ranks resume the same run dir."""
    first = launch(f"{key}/2-ranks", 2, [*LOCKSTEP, *MLAAN, f"--train.max_steps="
                                         f"{LOCK_STEPS_PER_EPOCH}"], root / key,
                   timeout=RUN_TIMEOUT_S)
    first.notes["checkpoints"] = sorted(p.name for p in (first.run_dir / "checkpoints").glob(
        "step_*") if (p / "meta.json").is_file())
    first.notes["summary"] = ((first.run_dir / "summary.json").read_text()
                              if (first.run_dir / "summary.json").is_file() else None)
    first.notes["aborted_at_exit"] = first.aborted_at_exit()
    if first.returncode != 0 and not first.notes["aborted_at_exit"]:
        return Result(key, first.cmd, first.returncode, first.stdout, first.stderr,
                      first.run_dir, first.seconds, [])
    second = launch(f"{key}/4-ranks", 4, [*LOCKSTEP, *MLAAN, "--run.resume=true"], root / key,
                    timeout=RUN_TIMEOUT_S)
    second.phases = [first]
    return second


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


JOBS = {}
for _m, _margs in METHODS.items():
    JOBS[f"ref-{_m}"] = partial(_train_job, 1, [*LOCKSTEP, *_margs])
    for _n in (2, 4):
        JOBS[f"lock-{_m}-{_n}"] = partial(_train_job, _n, [*LOCKSTEP, *_margs])
JOBS["ref-window3"] = partial(_train_job, 1, WINDOW3)
JOBS["lock-window3-3"] = partial(_train_job, 3, [
    *WINDOW3, "--pipeline.partition=[" + ",".join(map(str, WINDOW3_PARTITION)) + "]"])
JOBS["ref-sync3"] = partial(_train_job, 1, [*LOCKSTEP, *MLAAN,
                                            f"--pipeline.lam_sync_every={SYNC_EVERY}"])
JOBS["lock-sync3-2"] = partial(_train_job, 2, [*LOCKSTEP, *MLAAN,
                                               f"--pipeline.lam_sync_every={SYNC_EVERY}"])
for _n, _mb in ASYNC_CASES:
    # a fixed partition, so runs with different microbatches have comparable ranks
    JOBS[f"async-{_n}-mb{_mb}"] = partial(_train_job, _n, [
        *ASYNC, *MLAAN, f"--pipeline.microbatches={_mb}",
        "--pipeline.partition=[" + ",".join([str(K // _n)] * _n) + "]"])
# LAM across ranks in async mode: a fast EMA, so a twin that follows its live block ends up
# close to it; launched twice, since async runs must not depend on timing
ASYNC_LAM = [*ASYNC, *MLAAN, "--method.ema_decay=0.9", "--pipeline.microbatches=2",
             "--pipeline.partition=[1,1,1,1]"]
JOBS["async-lam-4"] = partial(_train_job, 4, ASYNC_LAM)
JOBS["async-lam-4-again"] = partial(_train_job, 4, ASYNC_LAM)
JOBS["resume-2-then-4"] = _resume_job

# Data-parallel replicas. At lr 0.1 these 16-image runs are chaotic enough that float rounding
# (a sum over two half-batches instead of one batch) grows past 1e-5 within a few steps, even
# between two single-process runs whose batch norm merely sums in another order; at lr 0.02
# they are well-conditioned, and the comparison tests the replica logic, not the rounding.
DP_LR = ["--train.lr=0.02"]
DP_METHODS = ["dgl+mlaan", "infopro+mlaan"]
DP_LAYOUTS = {"2x2": 4, "2x1": 2}     # D x S -> ranks
for _m in DP_METHODS:
    JOBS[f"ref-lr002-{_m}"] = partial(_train_job, 1, [*LOCKSTEP, *METHODS[_m], *DP_LR])
    for _lay, _n in DP_LAYOUTS.items():
        JOBS[f"dp-{_lay}-{_m}"] = partial(_train_job, _n, [
            *LOCKSTEP, *METHODS[_m], *DP_LR, "--pipeline.replicas=2", "--pipeline.sync_bn=true"])
# end-to-end BP cannot be cut into stages, but D replicas of it are plain data parallelism
JOBS["ref-lr002-bp"] = partial(_train_job, 1, [*LOCKSTEP, *BP, *DP_LR])
JOBS["dp-2x1-bp"] = partial(_train_job, 2, [*LOCKSTEP, *BP, *DP_LR, "--pipeline.replicas=2",
                                            "--pipeline.sync_bn=true"])
JOBS["dp-2x2-async"] = partial(_train_job, 4, [*ASYNC, *MLAAN, "--pipeline.replicas=2"])
JOBS["dp-indivisible"] = partial(_train_job, 3, [*LOCKSTEP, *MLAAN, "--pipeline.replicas=2"],
                                 timeout=FAIL_TIMEOUT_S)


def _dp_resume_job(key: str, root: Path) -> Result:
    """D=2 x S=2 stops after one epoch; one process resumes the same run dir."""
    dp = [*LOCKSTEP, *MLAAN, *DP_LR]
    first = launch(f"{key}/2x2", 4, [*dp, "--pipeline.replicas=2", "--pipeline.sync_bn=true",
                                     f"--train.max_steps={LOCK_STEPS_PER_EPOCH}"], root / key,
                   timeout=RUN_TIMEOUT_S)
    first.notes["aborted_at_exit"] = first.aborted_at_exit()
    if first.returncode != 0 and not first.notes["aborted_at_exit"]:
        return first
    second = launch(f"{key}/1", 1, [*dp, "--run.resume=true"], root / key,
                    timeout=RUN_TIMEOUT_S)
    second.phases = [first]
    return second


JOBS["dp-resume-2x2-then-1"] = _dp_resume_job
JOBS["handshake"] = _handshake_job
WORLD_GT_K = (3, 2)          # ranks, model.K
JOBS["world-gt-K"] = partial(_train_job, WORLD_GT_K[0], [*LOCKSTEP, *MLAAN,
                                                         f"--model.K={WORLD_GT_K[1]}"],
                             timeout=FAIL_TIMEOUT_S)


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


def needs(fn):
    """Declares the jobs a test needs, as a function of its parameters (used to prefetch)."""
    def deco(test):
        test.needs = fn
        return test
    return deco


def _pool_size() -> int:
    if os.environ.get("PIPEMLAAN_TEST_JOBS"):
        return max(1, int(os.environ["PIPEMLAAN_TEST_JOBS"]))
    return max(2, min(4, (os.cpu_count() or 2) // 2 + 1))


@pytest.fixture(scope="module")
def runner(request, tmp_path_factory):
    r = Runner(tmp_path_factory.mktemp("pipeline-runs"), _pool_size())
    # Start every run the selected tests of this module will need, in test order.
    for item in request.session.items:
        fn = getattr(item, "function", None)
        if getattr(item, "module", None) is request.module and hasattr(fn, "needs"):
            params = item.callspec.params if hasattr(item, "callspec") else {}
            for key in fn.needs(**params):
                r.submit(key)
    yield r
    r.close()


# ---- comparisons ---------------------------------------------------------------------------
def assert_losses_match(ref: Result, got: Result, steps: int, num_modules: int,
                        replicas: int = 1) -> None:
    a = ref.losses()
    b = got.losses() if replicas == 1 else got.replica_mean_losses(replicas)
    expected = {(s, k) for s in range(1, steps + 1) for k in range(num_modules)}
    assert set(a) == expected, f"{ref.key}: logged {sorted(set(a) ^ expected)[:8]} ..."
    assert set(b) == expected, f"{got.key}: missing/extra {sorted(set(b) ^ expected)[:8]}"
    keys = sorted(expected)
    ta = torch.tensor([a[x] for x in keys], dtype=torch.float64)
    tb = torch.tensor([b[x] for x in keys], dtype=torch.float64)
    if not torch.allclose(tb, ta, rtol=RTOL, atol=ATOL):
        bad = [(x, a[x], b[x]) for x in keys
               if not torch.allclose(torch.tensor(b[x]), torch.tensor(a[x]), rtol=RTOL,
                                     atol=ATOL)]
        raise AssertionError(f"{got.key} vs {ref.key}: {len(bad)} (step, module) losses differ; "
                             f"first: {bad[:5]}")


def assert_params_match(ref: Result, got: Result, num_modules: int) -> None:
    assert ref.final_checkpoint().name == got.final_checkpoint().name, \
        (ref.final_checkpoint(), got.final_checkpoint())
    sa, sb = ref.module_states(num_modules), got.module_states(num_modules)
    for k in range(num_modules):
        assert set(sa[k]) == set(sb[k]), f"module {k}: state dict keys differ"
        assert sa[k], f"module {k}: empty state dict"
        for name, ta in sa[k].items():
            tb = sb[k][name]
            assert ta.shape == tb.shape, f"module {k} {name}: {ta.shape} vs {tb.shape}"
            if ta.is_floating_point():
                ok = torch.allclose(tb, ta, rtol=RTOL, atol=ATOL)
                diff = (tb - ta).abs().max().item() if ta.numel() else 0.0
            else:
                ok, diff = torch.equal(tb, ta), None
            assert ok, (f"{got.key} vs {ref.key}: module {k} tensor {name} differs "
                        f"(max abs diff {diff})")


def states_differ(a: Result, b: Result, num_modules: int) -> bool:
    sa, sb = a.module_states(num_modules), b.module_states(num_modules)
    return any(not torch.allclose(sb[k][n], t, rtol=RTOL, atol=ATOL)
               for k in sa for n, t in sa[k].items() if t.is_floating_point())


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
@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("method", list(METHODS))
@needs(lambda method, ranks: [f"ref-{method}", f"lock-{method}-{ranks}"])
def test_lockstep_equals_single_process(runner, method, ranks):
    ref = runner.get(f"ref-{method}").check()
    got = runner.get(f"lock-{method}-{ranks}").check()
    summary = got.summary()
    assert summary["world_size"] == ranks and summary["mode"] == "lockstep"
    assert len(summary["partition"]) == ranks and sum(summary["partition"]) == K
    assert summary["method"] == method
    assert_losses_match(ref, got, LOCK_STEPS, K)
    assert_params_match(ref, got, K)


@needs(lambda: ["ref-window3", "lock-window3-3"])
def test_lockstep_window3_three_ranks_equals_single_process(runner):
    ref = runner.get("ref-window3").check()
    got = runner.get("lock-window3-3").check()
    summary = got.summary()
    assert summary["partition"] == WINDOW3_PARTITION and summary["world_size"] == 3
    assert summary["K"] == WINDOW3_K
    assert_losses_match(ref, got, LOCK_STEPS, WINDOW3_K)
    assert_params_match(ref, got, WINDOW3_K)


@needs(lambda: ["ref-sync3", "lock-sync3-2", "ref-dgl+mlaan"])
def test_lam_sync_interval_lockstep_equals_single_process(runner):
    ref = runner.get("ref-sync3").check()
    got = runner.get("lock-sync3-2").check()
    assert_losses_match(ref, got, LOCK_STEPS, K)
    assert_params_match(ref, got, K)
    # the interval is really in effect: it changes the run compared with syncing every step
    every_step = runner.get("ref-dgl+mlaan").check()
    assert states_differ(ref, every_step, K), \
        "pipeline.lam_sync_every=3 gave the same weights as lam_sync_every=1"


# ---- evaluation through the pipeline -------------------------------------------------------
@pytest.mark.parametrize("method", list(METHODS))
@needs(lambda method: [f"ref-{method}", f"lock-{method}-2"])
def test_lockstep_evaluation_equals_single_process(runner, method):
    ref = runner.get(f"ref-{method}").check().summary()
    got = runner.get(f"lock-{method}-2").check().summary()
    assert len(got["per_module_test_error"]) == K
    assert got["per_module_test_error"] == ref["per_module_test_error"]
    assert got["test_top1_error"] == ref["test_top1_error"]
    assert got["test_top5_error"] == ref["test_top5_error"]
    assert got["test_top1_error"] == got["per_module_test_error"][-1]
    assert torch.allclose(torch.tensor(got["param_checksum"], dtype=torch.float64),
                          torch.tensor(ref["param_checksum"], dtype=torch.float64),
                          rtol=RTOL, atol=ATOL)
    assert got["final_train_loss_per_module"] == pytest.approx(
        ref["final_train_loss_per_module"], rel=RTOL, abs=ATOL)
    # every eval line (one per epoch) agrees too, not only the final summary
    ev_ref = [r for r in runner.get(f"ref-{method}").metrics() if r["kind"] == "eval"]
    ev_got = [r for r in runner.get(f"lock-{method}-2").metrics() if r["kind"] == "eval"]
    assert [r["step"] for r in ev_got] == [r["step"] for r in ev_ref]
    assert len(ev_ref) == LOCK_EPOCHS
    for a, b in zip(ev_ref, ev_got):
        assert b["per_module_test_error"] == a["per_module_test_error"]
        assert b["test_top5_error"] == a["test_top5_error"]


# ---- async mode ----------------------------------------------------------------------------
@pytest.mark.parametrize("ranks,microbatches", ASYNC_CASES,
                         ids=[f"{n}ranks-mb{mb}" for n, mb in ASYNC_CASES])
@needs(lambda ranks, microbatches: [f"async-{ranks}-mb{microbatches}"])
def test_async_pipeline_trains(runner, ranks, microbatches):
    res = runner.get(f"async-{ranks}-mb{microbatches}").check()
    s = res.summary()
    assert s["world_size"] == ranks and s["mode"] == "async"
    assert s["steps"] == ASYNC_STEPS and s["epochs"] == ASYNC_EPOCHS
    assert len(s["partition"]) == ranks and sum(s["partition"]) == K
    assert len(s["peak_memory_bytes"]) == ranks
    assert all(b > 0 for b in s["peak_memory_bytes"])
    assert len(s["per_module_test_error"]) == K
    assert all(0.0 <= e <= 100.0 for e in s["per_module_test_error"])
    assert s["test_top1_error"] == s["per_module_test_error"][-1]
    # learned something: the network's error is far below chance (90% for 10 classes)
    assert s["test_top1_error"] < CHANCE_ERROR - 30.0, s["per_module_test_error"]
    assert all(v is not None for v in s["final_train_loss_per_module"])

    losses = res.losses()
    assert set(losses) == {(t, k) for t in range(1, ASYNC_STEPS + 1) for k in range(K)}
    quarter = ASYNC_STEPS // 4
    for k in range(K):
        early = sum(losses[(t, k)] for t in range(1, quarter + 1)) / quarter
        late = sum(losses[(t, k)] for t in range(ASYNC_STEPS - quarter + 1, ASYNC_STEPS + 1)) \
            / quarter
        assert late < early, f"module {k}: mean loss {early:.4f} early, {late:.4f} late"


@needs(lambda: ["async-lam-4"])
def test_async_twins_follow_live_blocks_on_other_ranks(runner):
    """Every twin's live block sits on a later rank here. In async mode the owners' snapshots
    must reach the twin (they once never did: gloo's irecv never reports completion before it
    is waited on, so polling for arrived snapshots left every twin at its initial weights)."""
    res = runner.get("async-lam-4").check()
    cfg = load_config(None, ASYNC_LAM)
    _, mods = build_local_modules(cfg, dataset_spec(cfg.data))
    states = res.module_states(K)
    followed = 0
    for m in mods:
        if m.twin is None:
            continue
        owner = next(o for o in mods if o.block_range[0] <= m.twin_source <= o.block_range[1])
        assert owner.index != m.index
        live_prefix = f"body.{m.twin_source - owner.block_range[0]}."
        live = {n[len(live_prefix):]: t for n, t in states[owner.index].items()
                if n.startswith(live_prefix)}
        twin = {n[len("h.twin."):]: t for n, t in states[m.index].items()
                if n.startswith("h.twin.")}
        init = m.twin.state_dict()
        names = [n for n, t in init.items() if t.is_floating_point()]
        assert names and set(names) <= set(live) and set(names) <= set(twin)
        moved = sum(float((live[n] - init[n]).norm() ** 2) for n in names) ** 0.5
        gap = sum(float((live[n] - twin[n]).norm() ** 2) for n in names) ** 0.5
        assert moved > 0, f"module {owner.index}'s live block never trained"
        assert gap < 0.6 * moved, (f"module {m.index}'s twin stayed far from the live block "
                                   f"it follows ({gap:.4f} vs {moved:.4f} from the start)")
        followed += 1
    assert followed >= 2, "the config has fewer cross-rank twins than this test needs"


@needs(lambda: ["async-lam-4", "async-lam-4-again"])
def test_async_runs_do_not_depend_on_timing(runner):
    """Async staleness is fixed by the schedule (micro-batches in flight, the LAM lag), not
    by which message happens to arrive first: two launches give the same weights."""
    a = runner.get("async-lam-4").check()
    b = runner.get("async-lam-4-again").check()
    sa, sb = a.module_states(K), b.module_states(K)
    for k in range(K):
        for name, t in sa[k].items():
            assert torch.equal(t, sb[k][name]), f"module {k} {name} differs between launches"
    assert a.summary()["per_module_test_error"] == b.summary()["per_module_test_error"]


@pytest.mark.parametrize("ranks", sorted({n for n, _ in ASYNC_CASES}))
@needs(lambda ranks: [f"async-{ranks}-mb{mb}" for n, mb in ASYNC_CASES if n == ranks])
def test_async_more_microbatches_keep_more_batches_in_flight(runner, ranks):
    """Every rank but the last holds the graphs of its unfinished batches until the next rank's
    window gradients arrive: with more microbatches in flight, more of them are alive."""
    mbs = sorted(mb for n, mb in ASYNC_CASES if n == ranks)
    runs = [runner.get(f"async-{ranks}-mb{mb}").check().summary() for mb in mbs]
    for s in runs:
        assert s["partition"] == runs[0]["partition"] and len(s["activation_bytes"]) == ranks
    for fewer, more in zip(runs, runs[1:]):
        for r in range(ranks - 1):
            assert more["activation_bytes"][r] > fewer["activation_bytes"][r], \
                (r, [s["activation_bytes"] for s in runs])
            assert more["peak_memory_bytes"][r] > fewer["peak_memory_bytes"][r]


# ---- per-rank metrics ----------------------------------------------------------------------
METRIC_RUNS = {"lockstep-2ranks": "lock-dgl+mlaan-2", "lockstep-4ranks": "lock-dgl+mlaan-4",
               "async-4ranks": "async-4-mb3", "async-2ranks": "async-2-mb2"}


@pytest.mark.parametrize("run", list(METRIC_RUNS))
@needs(lambda run: [METRIC_RUNS[run]])
def test_per_rank_metrics(runner, run):
    res = runner.get(METRIC_RUNS[run]).check()
    s = res.summary()
    world, partition = s["world_size"], s["partition"]
    steps = s["steps"]
    lines = res.train_lines()
    by_rank: dict[int, list[dict]] = {}
    for r in lines:
        by_rank.setdefault(r["rank"], []).append(r)
    assert sorted(by_rank) == list(range(world))
    start = 0
    for rank in range(world):
        mine = by_rank[rank]
        owned = list(range(start, start + partition[rank]))
        start += partition[rank]
        assert sorted(r["step"] for r in mine) == list(range(1, steps + 1)), f"rank {rank}"
        for r in mine:
            assert r["modules"] == owned, f"rank {rank} step {r['step']}: {r['modules']}"
            assert sorted(int(k) for k in r["losses"]) == owned
            assert r["recv_wait_s"] >= 0 and r["send_wait_s"] >= 0
            assert r["recv_wait_frac"] >= 0 and r["send_wait_frac"] >= 0
            assert r["images_per_s"] > 0
            assert r["compute_frac"] > 0
            assert r["activation_bytes"] > 0 and r["peak_memory_bytes"] > 0
        if rank > 0:
            assert sum(r["recv_wait_s"] for r in mine) > 0, f"rank {rank} never waited"
    assert start == K


# ---- checkpoint and resume on another number of ranks --------------------------------------
@needs(lambda: ["resume-2-then-4", "ref-dgl+mlaan"])
def test_resume_with_more_ranks_equals_uninterrupted_run(runner):
    res = runner.get("resume-2-then-4").check()
    first = res.phases[0]
    # the 2-rank launch stopped after one epoch and left that checkpoint as its newest
    assert first.notes["checkpoints"][-1] == f"step_{LOCK_STEPS_PER_EPOCH:08d}", first.notes
    assert first.notes["summary"] is not None
    s1 = json.loads(first.notes["summary"])
    assert s1["world_size"] == 2 and s1["steps"] == LOCK_STEPS_PER_EPOCH
    ref = runner.get("ref-dgl+mlaan").check()
    meta = json.loads((res.final_checkpoint() / "meta.json").read_text())
    assert meta["step"] == LOCK_STEPS and meta["world_size"] == 4
    s = res.summary()
    assert s["world_size"] == 4 and s["steps"] == LOCK_STEPS and s["epochs"] == LOCK_EPOCHS
    assert "resumed from" in res.stdout
    # the train lines of both launches (steps 1-8 on 2 ranks, 9-16 on 4) equal the reference
    assert_losses_match(ref, res, LOCK_STEPS, K)
    assert_params_match(ref, res, K)
    assert s["per_module_test_error"] == ref.summary()["per_module_test_error"]


# ---- start-up failures: named errors, not hangs --------------------------------------------
@needs(lambda: ["handshake"])
def test_handshake_rejects_rank_with_different_config(runner):
    res = runner.get("handshake")
    errors = failed_cleanly(res)
    assert any("different configuration" in e or "shape" in e for e in errors), res.describe()
    assert not (res.run_dir / "summary.json").exists()


@needs(lambda: ["world-gt-K"])
def test_world_larger_than_K_is_a_config_error(runner):
    res = runner.get("world-gt-K")
    errors = failed_cleanly(res)
    assert errors, res.describe()
    # one line, the same from every rank that got to print it
    assert len(errors) <= WORLD_GT_K[0] and len(set(errors)) == 1, errors
    assert "model.K" in errors[0] and f"{WORLD_GT_K[0]} ranks" in errors[0], errors
    assert not res.run_dir.exists(), f"{res.run_dir} was created"


# ---- data-parallel replicas ----------------------------------------------------------------
@pytest.mark.parametrize("layout", list(DP_LAYOUTS))
@pytest.mark.parametrize("method", DP_METHODS)
@needs(lambda method, layout: [f"ref-lr002-{method}", f"dp-{layout}-{method}"])
def test_replicas_lockstep_equal_single_process_at_same_global_batch(runner, method, layout):
    ref = runner.get(f"ref-lr002-{method}").check()
    got = runner.get(f"dp-{layout}-{method}").check()
    s, r = got.summary(), ref.summary()
    stages = int(layout.split("x")[1])
    assert (s["world_size"], s["replicas"], s["stages"]) == (DP_LAYOUTS[layout], 2, stages)
    assert len(s["partition"]) == stages and sum(s["partition"]) == K
    assert_losses_match(ref, got, LOCK_STEPS, K, replicas=2)
    assert_params_match(ref, got, K)
    assert s["per_module_test_error"] == r["per_module_test_error"]
    assert s["test_top5_error"] == r["test_top5_error"]
    assert s["final_train_loss_per_module"] == pytest.approx(r["final_train_loss_per_module"],
                                                             rel=RTOL, abs=ATOL)
    sums = s["param_checksum_per_rank"]
    assert sums[:stages] == sums[stages:], "the replicas' weights drifted apart"


@needs(lambda: ["ref-lr002-bp", "dp-2x1-bp"])
def test_bp_replicas_are_data_parallel_bp(runner):
    ref = runner.get("ref-lr002-bp").check()
    got = runner.get("dp-2x1-bp").check()
    s = got.summary()
    assert (s["world_size"], s["replicas"], s["stages"], s["K"]) == (2, 2, 1, 1)
    assert_losses_match(ref, got, LOCK_STEPS, 1, replicas=2)
    assert_params_match(ref, got, 1)
    assert s["per_module_test_error"] == ref.summary()["per_module_test_error"]


@needs(lambda: ["ref-lr002-dgl+mlaan", "dp-2x2-dgl+mlaan"])
def test_replicas_really_split_the_batch(runner):
    """Negative control for the equality above: each replica's own loss is over a different
    half of the batch, so the per-replica losses differ from each other and from the mean."""
    got = runner.get("dp-2x2-dgl+mlaan").check()
    lines = [r for r in got.train_lines() if r["step"] == 1 and r["stage"] == 0]
    assert sorted(r["replica"] for r in lines) == [0, 1]
    a, b = (float(r["losses"]["0"]) for r in sorted(lines, key=lambda r: r["replica"]))
    assert abs(a - b) > 1e-4, (a, b)


@needs(lambda: ["dp-resume-2x2-then-1", "ref-lr002-dgl+mlaan"])
def test_replica_checkpoint_resumes_in_one_process(runner):
    res = runner.get("dp-resume-2x2-then-1").check()
    ref = runner.get("ref-lr002-dgl+mlaan").check()
    first = res.run_dir / "checkpoints" / f"step_{LOCK_STEPS_PER_EPOCH:08d}" / "meta.json"
    meta = json.loads(first.read_text())      # written by the 2 x 2 launch
    assert meta["replicas"] == 2 and meta["world_size"] == 4
    assert json.loads((res.final_checkpoint() / "meta.json").read_text())["world_size"] == 1
    assert "resumed from" in res.stdout
    assert_params_match(ref, res, K)
    assert res.summary()["per_module_test_error"] == ref.summary()["per_module_test_error"]


@needs(lambda: ["dp-2x2-async"])
def test_async_replicas_train_and_stay_identical(runner):
    res = runner.get("dp-2x2-async").check()
    s = res.summary()
    assert (s["world_size"], s["replicas"], s["stages"], s["mode"]) == (4, 2, 2, "async")
    assert s["steps"] == ASYNC_STEPS and len(s["peak_memory_bytes"]) == 4
    assert s["test_top1_error"] < CHANCE_ERROR - 30.0, s["per_module_test_error"]
    sums = s["param_checksum_per_rank"]
    assert sums[:2] == sums[2:], "the replicas' weights drifted apart"
    losses = res.replica_mean_losses(2)
    quarter = ASYNC_STEPS // 4
    for k in range(K):
        early = sum(losses[(t, k)] for t in range(1, quarter + 1))
        late = sum(losses[(t, k)] for t in range(ASYNC_STEPS - quarter + 1, ASYNC_STEPS + 1))
        assert late < early, (k, early, late)


@needs(lambda: ["dp-indivisible"])
def test_replicas_must_divide_the_world(runner):
    errors = failed_cleanly(runner.get("dp-indivisible"))
    assert errors and len(set(errors)) == 1, errors
    assert "pipeline.replicas=2" in errors[0] and "3 ranks" in errors[0], errors


# ---- clean shutdown ------------------------------------------------------------------------
EXPECTED_FAILURES = {"handshake", "world-gt-K", "dp-indivisible"}


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
