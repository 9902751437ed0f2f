"""The tiny training runs the pipeline tests compare, and the checks they share.

Not a test module; imported by test_pipeline.py (runs launched as processes, torchrun for more
than one rank) and test_inprocess.py (the same runs with one thread per rank, tests/inprocess.py).
Both modules check a run through the same functions here, so a check that moved from a torchrun
launch to an in-process run is the same check:

- the run configurations (`TRAIN_RUNS`: key -> (ranks, overrides)) and their constants;
- `RunOutputs`: what a finished run left in its run folder (metrics.jsonl, summary.json,
  checkpoints), whichever way it ran;
- the comparisons (`assert_losses_match`, `assert_params_match`, `states_differ`, tolerances
  RTOL/ATOL) and the checks of one run (`check_*`);
- `run_in_process`: one run by key with inprocess.run_ranks (a thread per rank), picklable so
  that runs can go to a pool of worker processes; `InProcessRuns`: those runs, each once per
  session (conftest.py's `inprocess_runs` fixture), shared by test_inprocess.py and
  test_pipeline.py;
- `needs`: how a test declares the runs it needs, so that a module can start them up front.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import time
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pipemlaan.config import load_config, method_flags
from pipemlaan.data import dataset_spec
from pipemlaan.local.module import build_local_modules

RTOL, ATOL = 1e-5, 1e-6

# ---- the tiny runs -------------------------------------------------------------------------
K = 4
BATCH = 16
NUM_CLASSES = 10             # the synthetic dataset's classes
CHANCE_ERROR = 100.0 * (1 - 1 / NUM_CLASSES)
# resnet8 with K=4 puts the stem in a module of its own. Under the reference plan (the default)
# the first window then covers modules 0-2, which 4 ranks cannot hold; the pipeline
# tests give every module a head (method.first_modules_head) so that every rank count works,
# and the compact heads keep them fast (the machinery does not depend on the head kind);
# REF_PLAN runs check the defaults, heads and plan, where they fit.
# The progress view stays on (the default; plain lines, stdout being no terminal): a user's
# pipeline runs with it, and a record it cannot show (a rank without a loss of its own) must
# fail here.
TINY_PLAN = ["--data.name=synthetic", "--data.synthetic_image=[3,8,8]", "--model.name=resnet8",
             f"--model.K={K}", f"--train.batch_size={BATCH}", "--run.log_every=1",
             "--train.device=cpu"]
TINY = [*TINY_PLAN, "--method.first_modules_head=true", "--method.heads=compact"]

LOCK_SAMPLES, LOCK_EPOCHS = 128, 2
LOCK_STEPS_PER_EPOCH = LOCK_SAMPLES // BATCH
LOCK_STEPS = LOCK_EPOCHS * LOCK_STEPS_PER_EPOCH
LOCKSTEP = TINY + [f"--data.synthetic_size={LOCK_SAMPLES}", f"--train.epochs={LOCK_EPOCHS}",
                   "--pipeline.mode=lockstep"]

ASYNC_SAMPLES, ASYNC_EPOCHS = 256, 2
ASYNC_STEPS = ASYNC_EPOCHS * (ASYNC_SAMPLES // BATCH)
ASYNC = TINY + [f"--data.synthetic_size={ASYNC_SAMPLES}", f"--train.epochs={ASYNC_EPOCHS}",
                "--pipeline.mode=async"]

METHODS = {m: method_flags(m) for m in ("dgl", "dgl+mlm", "dgl+lam", "dgl+mlaan",
                                         "infopro+mlaan")}
MLAAN = METHODS["dgl+mlaan"]
BP = method_flags("bp")
# pipelines of K=4 modules compared with the single process (3 ranks: the reference-plan and
# window-3 runs below)
LOCK_RANKS = [2, 4]

WINDOW3_K = 6
WINDOW3 = [a for a in LOCKSTEP if not a.startswith(("--model.K=", "--model.name="))] + \
    ["--model.name=resnet14", f"--model.K={WINDOW3_K}", *MLAAN, "--method.window=3"]
WINDOW3_PARTITION = [2, 2, 2]

SYNC_EVERY = 3
SYNC3 = [*LOCKSTEP, *MLAAN, f"--pipeline.lam_sync_every={SYNC_EVERY}"]
ASYNC_CASES = [(2, 2), (2, 3), (4, 2), (4, 3)]

# LAM across ranks in async mode: a fast EMA, so a twin that follows its live block ends up
# close to it
ASYNC_LAM = [*ASYNC, *MLAAN, "--method.ema_decay=0.9", "--pipeline.in_flight=2",
             "--pipeline.partition=[1,1,1,1]"]

# Data-parallel replicas. At lr 0.1 these 16-image runs are chaotic enough that float rounding
# (a sum over two half-batches instead of one batch) grows past 1e-5 within a few steps, even
# between two single-process runs whose batch norm merely sums in another order; at lr 0.02
# they are well-conditioned, and the comparison tests the replica logic, not the rounding.
# (TINY's compact heads matter here too: the reference DGL* head normalises 512 features over
# each replica's 8 images (BatchNorm1d), equal to one batch norm over 16 to float32 rounding
# (test_replica_batch_norm.py), but that rounding grows past 1e-5 within a few steps.)
DP_LR = ["--train.lr=0.02"]
DP_METHODS = ["dgl+mlaan", "infopro+mlaan"]
DP_LAYOUTS = {"2x2": 4, "2x1": 2}     # D x S -> ranks
DP_SYNC = ["--pipeline.replicas=2", "--pipeline.sync_bn=true"]


def _partition(ranks: int) -> str:
    return "--pipeline.partition=[" + ",".join([str(K // ranks)] * ranks) + "]"


# Every plain training run the pipeline tests use, by key: (ranks, overrides). Ranks 1 is the
# single-process reference a pipeline is compared with.
TRAIN_RUNS: dict[str, tuple[int, list[str]]] = {}
for _m, _margs in METHODS.items():
    TRAIN_RUNS[f"ref-{_m}"] = (1, [*LOCKSTEP, *_margs])
    for _n in LOCK_RANKS:
        TRAIN_RUNS[f"lock-{_m}-{_n}"] = (_n, [*LOCKSTEP, *_margs])
TRAIN_RUNS["ref-window3"] = (1, WINDOW3)
TRAIN_RUNS["lock-window3-3"] = (3, [
    *WINDOW3, "--pipeline.partition=[" + ",".join(map(str, WINDOW3_PARTITION)) + "]"])
TRAIN_RUNS["ref-sync3"] = (1, SYNC3)
for _n in (2, 4):
    TRAIN_RUNS[f"lock-sync3-{_n}"] = (_n, SYNC3)
for _n, _mb in ASYNC_CASES:
    # a fixed partition, so runs with different microbatches have comparable ranks
    TRAIN_RUNS[f"async-{_n}-mb{_mb}"] = (_n, [*ASYNC, *MLAAN, f"--pipeline.in_flight={_mb}",
                                             _partition(_n)])
# one process emulating those async pipelines (engine/stage.py [Note: emulated staleness])
EMULATED_CASES = [(4, 2), (2, 3)]
for _n, _mb in EMULATED_CASES:
    TRAIN_RUNS[f"emulate-{_n}-mb{_mb}"] = (1, [*ASYNC, *MLAAN, f"--pipeline.in_flight={_mb}",
                                               _partition(_n).replace("partition",
                                                                      "emulate_async")])
TRAIN_RUNS["ref-async-single"] = (1, [*ASYNC, *MLAAN])
# pipeline.local_first (engine/stage.py [Note: local first]), in the pipeline and emulated
LOCAL_FIRST_CASES = [(4, 2), (2, 3)]
for _n, _mb in LOCAL_FIRST_CASES:
    _lf = [*ASYNC, *MLAAN, f"--pipeline.in_flight={_mb}", "--pipeline.local_first=true"]
    TRAIN_RUNS[f"async-{_n}-mb{_mb}-local"] = (_n, [*_lf, _partition(_n)])
    TRAIN_RUNS[f"emulate-{_n}-mb{_mb}-local"] = (1, [*_lf, _partition(_n).replace(
        "partition", "emulate_async")])
# pipeline.emulate_delay: one delay at a time, on MLAAN and on the methods that have only the
# other one (dgl+mlm: windows, no LAM; dgl+lam: LAM, no window crossing a rank)
_EMU4 = ["--pipeline.in_flight=2", _partition(4).replace("partition", "emulate_async")]
for _m in ("dgl+mlaan", "dgl+mlm", "dgl+lam"):
    if _m != "dgl+mlaan":
        TRAIN_RUNS[f"ref-async-single-{_m}"] = (1, [*ASYNC, *METHODS[_m]])
    for _d in ("window", "lam"):
        TRAIN_RUNS[f"emulate-4-mb2-{_d}-{_m}"] = (1, [*ASYNC, *METHODS[_m], *_EMU4,
                                                      f"--pipeline.emulate_delay={_d}"])
# weight prediction, in the pipeline and emulated in one process
_PRED = [*ASYNC, *MLAAN, "--pipeline.in_flight=2", "--pipeline.predict_weights=true"]
TRAIN_RUNS["async-2-mb2-pred"] = (2, [*_PRED, _partition(2)])
TRAIN_RUNS["emulate-2-mb2-pred"] = (1, [*_PRED, _partition(2).replace("partition",
                                                                         "emulate_async")])
# the late bodies' steps retuned (engine/stage.py [Note: stale steps]), pipeline and emulated
_STALE = [*ASYNC, *MLAAN, "--pipeline.in_flight=2", "--pipeline.stale_lr=0.5",
          "--pipeline.stale_momentum=0.95"]
TRAIN_RUNS["async-4-mb2-stale"] = (4, [*_STALE, _partition(4)])
TRAIN_RUNS["emulate-4-mb2-stale"] = (1, [*_STALE, _partition(4).replace("partition",
                                                                          "emulate_async")])
# the reference plan (modules 0 and 1 without a head, the first window over modules 0-2)
_DEFAULTS = ("--method.first_modules_head=true", "--method.heads=compact")
REF_PLAN = [a for a in LOCKSTEP if a not in _DEFAULTS] + MLAAN
REF_PLAN_ASYNC = [a for a in ASYNC if a not in _DEFAULTS] + MLAAN
TRAIN_RUNS["ref-refplan"] = (1, REF_PLAN)
TRAIN_RUNS["lock-refplan-2"] = (2, REF_PLAN)
TRAIN_RUNS["lock-refplan-3"] = (3, REF_PLAN)
TRAIN_RUNS["async-refplan-2"] = (2, [*REF_PLAN_ASYNC, "--pipeline.in_flight=2",
                                     "--pipeline.partition=[1,3]"])
TRAIN_RUNS["emulate-refplan-2"] = (1, [*REF_PLAN_ASYNC, "--pipeline.in_flight=2",
                                       "--pipeline.emulate_async=[1,3]"])
TRAIN_RUNS["async-lam-4"] = (4, ASYNC_LAM)
TRAIN_RUNS["async-lam-4-again"] = (4, ASYNC_LAM)
for _m in DP_METHODS:
    TRAIN_RUNS[f"ref-lr002-{_m}"] = (1, [*LOCKSTEP, *METHODS[_m], *DP_LR])
    for _lay, _n in DP_LAYOUTS.items():
        TRAIN_RUNS[f"dp-{_lay}-{_m}"] = (_n, [*LOCKSTEP, *METHODS[_m], *DP_LR, *DP_SYNC])
# end-to-end BP cannot be cut into stages, but D replicas of it are plain data parallelism
TRAIN_RUNS["ref-lr002-bp"] = (1, [*LOCKSTEP, *BP, *DP_LR])
TRAIN_RUNS["dp-2x1-bp"] = (2, [*LOCKSTEP, *BP, *DP_LR, *DP_SYNC])
TRAIN_RUNS["dp-2x2-async"] = (4, [*ASYNC, *MLAAN, "--pipeline.replicas=2"])

# What a user runs first: every default (ResNet-20, K=4, the reference heads and plan, async,
# the live view on) but the data's size, for every method mix on 2 and 4 ranks.
USED_BY = ["--data.name=synthetic", "--data.synthetic_image=[3,8,8]", "--data.synthetic_size=64",
           "--data.test_subset=32", "--train.batch_size=16", "--train.epochs=1",
           "--run.log_every=1", "--train.device=cpu"]
VIEW_RANKS = [2, 4]
for _m, _margs in METHODS.items():
    for _n in VIEW_RANKS:
        TRAIN_RUNS[f"defaults-{_m}-{_n}"] = (_n, [*USED_BY, *_margs])

# checkpoint + resume on another number of ranks: (ranks, overrides) of each launch, one run dir
RESUME_2_THEN_4 = [(2, [*LOCKSTEP, *MLAAN, f"--train.max_steps={LOCK_STEPS_PER_EPOCH}"]),
                   (4, [*LOCKSTEP, *MLAAN, "--run.resume=true"])]
_DP = [*LOCKSTEP, *MLAAN, *DP_LR]
DP_RESUME_2X2_THEN_1 = [(4, [*_DP, *DP_SYNC, f"--train.max_steps={LOCK_STEPS_PER_EPOCH}"]),
                        (1, [*_DP, "--run.resume=true"])]
PHASED_RUNS = {"resume-2-then-4": RESUME_2_THEN_4, "dp-resume-2x2-then-1": DP_RESUME_2X2_THEN_1}


def needs(fn):
    """Declares the runs a test needs, as a function of its parameters (used to prefetch)."""
    def deco(test):
        test.needs = fn
        return test
    return deco


def needed_runs(request) -> list[str]:
    """The runs the selected tests of `request.module` need, in test order, each once."""
    keys: list[str] = []
    for item in request.session.items:
        fn = getattr(item, "function", None)
        if getattr(item, "module", None) is request.module and hasattr(fn, "needs"):
            params = item.callspec.params if hasattr(item, "callspec") else {}
            keys += [k for k in fn.needs(**params) if k not in keys]
    return keys


# ---- a finished run's outputs --------------------------------------------------------------
class RunOutputs:
    """What a run left in `self.run_dir`; `self.key` names it in messages. Mixed into the
    results of launched and of in-process runs."""

    key: str
    run_dir: Path

    def describe(self) -> str:
        """Says which run this is, for assertion messages (a launch adds its output)."""
        return f"[{self.key}] run dir {self.run_dir}"

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


# ---- one run in this process ---------------------------------------------------------------
INPROCESS_TIMEOUT_S = 120.0   # any wait inside a run; run_ranks gives a rank 4x that in all


def run_in_process(key: str, root: str) -> dict:
    """Runs `key` (TRAIN_RUNS, or the launches of PHASED_RUNS one after the other) with
    inprocess.run_ranks into root/run. Returns {"summary": rank 0's summary from the last
    launch, "stdout": what every launch printed, "phases": per launch, the complete checkpoints
    and summary.json right after it, "seconds"}. A failed run raises."""
    from inprocess import run_ranks

    base = Path(root)
    launches = PHASED_RUNS.get(key) or [TRAIN_RUNS[key]]
    t0, printed, summary, phases = time.monotonic(), [], None, []
    for ranks, args in launches:
        out = io.StringIO()
        try:
            with redirect_stdout(out):
                res = run_ranks([*args, f"--run.dir={base}", "--run.name=run"], ranks,
                                timeout_s=INPROCESS_TIMEOUT_S)
        finally:
            base.mkdir(parents=True, exist_ok=True)   # what it printed, for post-mortems
            (base / f"launch-{len(printed) + 1}.log").write_text(
                f"{ranks} rank(s): {' '.join(args)}\n--- stdout ---\n{out.getvalue()}")
        assert res["run_dir"] == base / "run", res["run_dir"]
        summary = res["summary"]
        printed.append(out.getvalue())
        path = base / "run" / "summary.json"
        phases.append({
            "checkpoints": sorted(p.name for p in (base / "run" / "checkpoints").glob("step_*")
                                  if (p / "meta.json").is_file()),
            "summary": json.loads(path.read_text()) if path.is_file() else None})
    return {"summary": summary, "stdout": "".join(printed), "phases": phases,
            "seconds": time.monotonic() - t0}


@dataclass
class InProcessRun(RunOutputs):
    key: str
    run_dir: Path
    stdout: str                   # what the run printed (every rank), every launch of it
    summary_obj: dict | None      # rank 0's summary, as train() returned it
    seconds: float
    # per launch of a phased run: the complete checkpoints and summary.json right after it
    phases: list[dict]

    def describe(self) -> str:
        return (f"[{self.key}] in-process, {len(self.phases)} launch(es), {self.seconds:.1f} s, "
                f"run dir {self.run_dir}\n--- stdout (tail) ---\n{self.stdout[-3000:]}")


def inprocess_jobs() -> int:
    """Worker processes for in-process runs: one per core, at most 2 (PIPEMLAAN_TEST_JOBS
    overrides; 1 runs them in pytest's own process)."""
    if os.environ.get("PIPEMLAAN_TEST_JOBS"):
        return max(1, int(os.environ["PIPEMLAAN_TEST_JOBS"]))
    return max(1, min(2, os.cpu_count() or 1))


class InProcessRuns:
    """In-process runs by key, each once per test session (conftest.py's `inprocess_runs`), so
    that test_pipeline.py compares its torchrun launches with the runs test_inprocess.py made.
    A run that raised raises again for every test that needs it. While a pool is open
    (`open_pool`), runs go to worker processes (each run whole in one of them, its ranks
    threads there) and can be started up front; otherwise a run runs in pytest's process."""

    def __init__(self, root: Path):
        self.root = root
        self.pool: ProcessPoolExecutor | None = None
        self.futures: dict[str, Future] = {}
        self.done: dict[str, InProcessRun | BaseException] = {}

    def open_pool(self, jobs: int) -> None:
        if jobs > 1 and self.pool is None:
            self.pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))

    def close_pool(self) -> None:
        """Keeps what finished; runs not started yet are dropped (a later get runs them)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        for key, fut in list(self.futures.items()):
            if fut.done() and not fut.cancelled():
                self._finish(key, fut.result)
        self.futures.clear()

    def submit(self, key: str) -> None:
        if self.pool is not None and key not in self.futures and key not in self.done:
            self.futures[key] = self.pool.submit(run_in_process, key, str(self.root / key))

    def get(self, key: str) -> InProcessRun:
        if key not in self.done:
            self.submit(key)
            fut = self.futures.pop(key, None)
            self._finish(key, fut.result if fut is not None
                         else lambda: run_in_process(key, str(self.root / key)))
        got = self.done[key]
        if isinstance(got, BaseException):
            raise got
        return got

    def _finish(self, key: str, result) -> None:
        try:
            got = result()
            self.done[key] = InProcessRun(key, self.root / key / "run", got["stdout"],
                                          got["summary"], got["seconds"], got["phases"])
        except BaseException as e:      # noqa: BLE001 - raised by get, for every test
            self.done[key] = e


# ---- comparisons ---------------------------------------------------------------------------
def assert_losses_match(ref: RunOutputs, got: RunOutputs, steps: int, num_modules: int,
                        replicas: int = 1) -> None:
    a = ref.losses()
    b = got.losses() if replicas == 1 else got.replica_mean_losses(replicas)
    # modules before the first window of the reference plan have no loss of their own
    logged = {k for _, k in a}
    assert set(range(2, num_modules)) <= logged <= set(range(num_modules)), logged
    expected = {(s, k) for s in range(1, steps + 1) for k in logged}
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


def assert_params_match(ref: RunOutputs, got: RunOutputs, num_modules: int) -> None:
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


def assert_params_identical(a: RunOutputs, b: RunOutputs, num_modules: int) -> None:
    """Bit for bit: every tensor of every module's final state, and the evaluation."""
    assert a.final_checkpoint().name == b.final_checkpoint().name
    sa, sb = a.module_states(num_modules), b.module_states(num_modules)
    for k in range(num_modules):
        assert set(sa[k]) == set(sb[k]) and sa[k], f"module {k}: state dict keys differ"
        for name, t in sa[k].items():
            assert torch.equal(t, sb[k][name]), \
                f"module {k} {name} differs between {a.key} and {b.key}"
    assert a.summary()["per_module_test_error"] == b.summary()["per_module_test_error"]


def states_differ(a: RunOutputs, b: RunOutputs, num_modules: int) -> bool:
    sa, sb = a.module_states(num_modules), b.module_states(num_modules)
    return any(not torch.allclose(sb[k][n], t, rtol=RTOL, atol=ATOL)
               for k in sa for n, t in sa[k].items() if t.is_floating_point())


# ---- checks of runs ------------------------------------------------------------------------
def check_lockstep_equals_single_process(ref: RunOutputs, got: RunOutputs, ranks: int,
                                         method: str) -> None:
    """Per-step losses of every module and final parameters of every module."""
    summary = got.summary()
    assert summary["world_size"] == ranks and summary["mode"] == "lockstep"
    assert len(summary["partition"]) == ranks and sum(summary["partition"]) == K
    assert summary["method"] == method
    assert_losses_match(ref, got, LOCK_STEPS, K)
    assert_params_match(ref, got, K)


def check_evaluation_equals_single_process(ref_run: RunOutputs, got_run: RunOutputs) -> None:
    """The summary's evaluation and checksum, and every epoch's eval line."""
    ref, got = ref_run.summary(), got_run.summary()
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
    ev_ref = [r for r in ref_run.metrics() if r["kind"] == "eval"]
    ev_got = [r for r in got_run.metrics() if r["kind"] == "eval"]
    assert [r["step"] for r in ev_got] == [r["step"] for r in ev_ref]
    assert len(ev_ref) == LOCK_EPOCHS
    for a, b in zip(ev_ref, ev_got):
        assert b["per_module_test_error"] == a["per_module_test_error"]
        assert b["test_top5_error"] == a["test_top5_error"]


def check_async_trains(res: RunOutputs, ranks: int) -> None:
    """An async pipeline finished every step on every rank and learned: every module's loss
    fell, the test error is far below chance."""
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


def check_twins_follow_live_blocks(res: RunOutputs, args: list[str]) -> None:
    """Every twin whose live block sits on another rank ends up close to that block (the
    owners' snapshots reached it), measured against how far the block moved from its start."""
    cfg = load_config(None, args)
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


def check_per_rank_metrics(res: RunOutputs) -> None:
    """Every rank logs every step, for the modules it owns, with its waits, throughput,
    compute share and memory; every rank but the first waited for its inputs."""
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
            # every part of the window (engine/p2p.py StepClock) adds up to its wall time
            parts = [r[f"{n}_s"] for n in ("compute", "recv_wait", "send_wait", "data_wait",
                                           "lam", "allreduce", "other")]
            assert sum(parts) == pytest.approx(r["window_s"], abs=1e-6)
            assert min(parts[:-1]) >= 0 and (r["data_wait_s"] > 0) == (r["stage"] == 0)
            assert r["tflops"] > 0 and r["peak_share"] > 0
            assert r["activation_bytes"] > 0 and r["peak_memory_bytes"] > 0
        if rank > 0:
            assert sum(r["recv_wait_s"] for r in mine) > 0, f"rank {rank} never waited"
    assert start == K


def check_replicas_equal_single_process(ref: RunOutputs, got: RunOutputs, layout: str) -> None:
    """D=2 replicas in lockstep with sync_bn equal the single process at the same global batch:
    losses averaged over the replicas, every parameter, every evaluation; the replicas' weights
    stay identical."""
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


def check_replicas_split_the_batch(got: RunOutputs) -> None:
    """Negative control for the replica equality: each replica's own loss is over a different
    half of the batch, so the per-replica losses differ from each other."""
    lines = [r for r in got.train_lines() if r["step"] == 1 and r["stage"] == 0]
    assert sorted(r["replica"] for r in lines) == [0, 1]
    a, b = (float(r["losses"]["0"]) for r in sorted(lines, key=lambda r: r["replica"]))
    assert abs(a - b) > 1e-4, (a, b)
