"""The distributed pipeline's equalities, checked in one process: every rank a thread, messages
handed over in memory (tests/inprocess.py, engine/comm.py LocalComm), the same trainer and the
same action lists as a torchrun launch, without starting a Python process per rank.

- lockstep pipelines of 2, 3 and 4 ranks equal the single-process run for every method
  (dgl, dgl+mlm, dgl+lam, dgl+mlaan, infopro+mlaan): per-step losses of every module from
  metrics.jsonl, every tensor of every module's final checkpoint, the evaluation (summary,
  param_checksum, every epoch's eval line); also with a cascade window of 3 (K=6 on 3 ranks)
  and with a LAM sync interval > 1 (which really changes the run);
- async pipelines (2 and 4 ranks, 2 and 3 microbatches in flight) train: every module's loss
  falls, the test error is far below chance, summary.json describes every rank; more
  microbatches keep more batches alive; twins follow live blocks on other ranks; two runs give
  the same weights bit for bit (async staleness is fixed by the schedule, not by timing);
- per-rank metrics lines (lockstep and async, 2 and 4 ranks);
- checkpoint + resume on another number of ranks (2 ranks, then 4) equals the uninterrupted run;
- data-parallel replicas: in lockstep with sync_bn, D=2 x S=2 and D=2 x S=1 equal the single
  process at the same global batch (losses averaged over the replicas, every parameter, every
  evaluation), BP replicas are data-parallel BP, the replicas really split the batch, a D x S
  checkpoint resumes in one process; async replicas train and stay identical.

What only separate processes can show (torchrun and gloo, start-up failures across processes,
exit codes) stays in test_pipeline.py, test_faults.py and test_multinode.py; test_pipeline.py
also checks that a torchrun launch and an in-process run give the same weights.

Run:
  cd /work/main && OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_inprocess.py -q --durations=10

Every run is whole in one process (its ranks are threads there) and is cached by key for the
session (runs.py TRAIN_RUNS, conftest.py `inprocess_runs`), so each single-process reference
runs once and serves every test that compares against it (test_pipeline.py compares its torchrun
launches with these runs too). While this module runs, the runs its selected tests need are
started up front on a pool of 2 worker processes (one per core; PIPEMLAAN_TEST_JOBS overrides,
and 1 runs them in pytest's own process). A run that hangs fails its test (inprocess.run_ranks'
timeouts) instead of blocking the suite; each run's output is kept next to it (launch-N.log).
"""

from __future__ import annotations

import json

import pytest
import torch

from pipemlaan.config import load_config
from pipemlaan.data import dataset_spec
from pipemlaan.local.module import build_local_modules

from inprocess import run_ranks

from runs import (ASYNC_CASES, ASYNC_LAM, ASYNC_STEPS, CHANCE_ERROR, DP_LAYOUTS, DP_METHODS,
                  EMULATED_CASES, K, LOCAL_FIRST_CASES, LOCK_EPOCHS, LOCK_RANKS, LOCK_STEPS, LOCK_STEPS_PER_EPOCH,
                  METHODS, REF_PLAN, USED_BY, VIEW_RANKS, WINDOW3_K, WINDOW3_PARTITION, assert_losses_match,
                  assert_params_identical, assert_params_match, check_async_trains,
                  check_evaluation_equals_single_process, check_lockstep_equals_single_process,
                  check_per_rank_metrics, check_replicas_equal_single_process,
                  check_replicas_split_the_batch, check_twins_follow_live_blocks, inprocess_jobs,
                  needed_runs, needs, states_differ)


@pytest.fixture(scope="module")
def runs(request, inprocess_runs):
    """The session's in-process runs (conftest.py), with a pool of worker processes while this
    module runs: every run its selected tests need is started up front, in test order."""
    inprocess_runs.open_pool(inprocess_jobs())
    for key in needed_runs(request):
        inprocess_runs.submit(key)
    yield inprocess_runs
    inprocess_runs.close_pool()


# ---- lockstep equivalence ------------------------------------------------------------------
@pytest.mark.parametrize("ranks", LOCK_RANKS)
@pytest.mark.parametrize("method", list(METHODS))
@needs(lambda method, ranks: [f"ref-{method}", f"lock-{method}-{ranks}"])
def test_lockstep_equals_single_process(runs, method, ranks):
    ref, got = runs.get(f"ref-{method}"), runs.get(f"lock-{method}-{ranks}")
    check_lockstep_equals_single_process(ref, got, ranks, method)
    # train() hands rank 0's summary back; summary.json holds the same
    assert got.summary_obj == got.summary()


@needs(lambda: ["ref-window3", "lock-window3-3"])
def test_lockstep_window3_three_ranks_equals_single_process(runs):
    ref, got = runs.get("ref-window3"), runs.get("lock-window3-3")
    summary = got.summary()
    assert summary["partition"] == WINDOW3_PARTITION and summary["world_size"] == 3
    assert summary["K"] == WINDOW3_K
    assert_losses_match(ref, got, LOCK_STEPS, WINDOW3_K)
    assert_params_match(ref, got, WINDOW3_K)


@pytest.mark.parametrize("ranks", [2, 4])
@needs(lambda ranks: ["ref-sync3", f"lock-sync3-{ranks}", "ref-dgl+mlaan"])
def test_lam_sync_interval_lockstep_equals_single_process(runs, ranks):
    ref, got = runs.get("ref-sync3"), runs.get(f"lock-sync3-{ranks}")
    assert got.summary()["world_size"] == ranks
    assert_losses_match(ref, got, LOCK_STEPS, K)
    assert_params_match(ref, got, K)
    # the interval is really in effect: it changes the run compared with syncing every step
    every_step = runs.get("ref-dgl+mlaan")
    assert states_differ(ref, every_step, K), \
        "pipeline.lam_sync_every=3 gave the same weights as lam_sync_every=1"


# ---- the defaults, live view on -------------------------------------------------------------
@pytest.mark.parametrize("ranks", VIEW_RANKS)
@pytest.mark.parametrize("method", list(METHODS))
@needs(lambda method, ranks: [f"defaults-{method}-{ranks}"])
def test_every_method_mix_runs_with_the_defaults_and_the_live_view(runs, method, ranks):
    """Every default but the data's size, the progress view on (plain lines: stdout is no
    terminal here; tests/test_ui.py renders the live view): a rank whose modules have no loss
    of their own (the reference plan's headless first module, a rank whose last module learns
    only through a window) once ended such runs at their first log line."""
    got = runs.get(f"defaults-{method}-{ranks}")
    summary = got.summary()
    assert summary["world_size"] == ranks and summary["steps"] == 4, got.describe()
    cfg = load_config(None, [*USED_BY, *METHODS[method]])
    _, mods = build_local_modules(cfg, dataset_spec(cfg.data))
    headless = [m.index for m in mods if m.g is None and m.index != len(mods) - 1]
    assert [k for k, e in enumerate(summary["per_module_test_error"]) if e is None] == headless
    if "mlm" in method or "mlaan" in method:
        assert headless == [0], "the reference plan leaves module 0 without a head"
    # the view's last line (plain lines: stdout is no terminal here): every rank, a loss or
    # "-" (no head) for each
    last = [line for line in got.stdout.splitlines() if line.startswith("step ")][-1]
    shown = next(f for f in last.split(" | ") if f.startswith("loss ")).split()[1:]
    assert shown[0::2] == [f"r{r}" for r in range(ranks)], got.describe()
    assert all(v == "-" or float(v) >= 0 for v in shown[1::2]), got.describe()


# ---- evaluation through the pipeline -------------------------------------------------------
@pytest.mark.parametrize("ranks", LOCK_RANKS)
@pytest.mark.parametrize("method", list(METHODS))
@needs(lambda method, ranks: [f"ref-{method}", f"lock-{method}-{ranks}"])
def test_lockstep_evaluation_equals_single_process(runs, method, ranks):
    check_evaluation_equals_single_process(runs.get(f"ref-{method}"),
                                           runs.get(f"lock-{method}-{ranks}"))


# ---- async mode ----------------------------------------------------------------------------
@pytest.mark.parametrize("ranks,microbatches", ASYNC_CASES,
                         ids=[f"{n}ranks-mb{mb}" for n, mb in ASYNC_CASES])
@needs(lambda ranks, microbatches: [f"async-{ranks}-mb{microbatches}"])
def test_async_pipeline_trains(runs, ranks, microbatches):
    check_async_trains(runs.get(f"async-{ranks}-mb{microbatches}"), ranks)


@pytest.mark.parametrize("ranks,microbatches", EMULATED_CASES,
                         ids=[f"{n}ranks-mb{mb}" for n, mb in EMULATED_CASES])
@needs(lambda ranks, microbatches: [f"async-{ranks}-mb{microbatches}",
                                    f"emulate-{ranks}-mb{microbatches}"])
def test_one_process_emulates_the_async_pipeline_exactly(runs, ranks, microbatches):
    """pipeline.emulate_async delays window gradients and LAM snapshots as the async
    pipeline does: the single process ends with the same weights bit for bit, so what async
    loses against the single process is staleness, not a bug of the pipeline."""
    pipe = runs.get(f"async-{ranks}-mb{microbatches}")
    emulated = runs.get(f"emulate-{ranks}-mb{microbatches}")
    assert emulated.summary()["world_size"] == 1
    assert_params_identical(pipe, emulated, K)
    assert emulated.losses() == pipe.losses()
    # and the staleness is real: the plain single process differs
    assert states_differ(pipe, runs.get("ref-async-single"), K)


@needs(lambda: ["ref-async-single", "emulate-4-mb2", "ref-async-single-dgl+mlm",
                "ref-async-single-dgl+lam", *(f"emulate-4-mb2-{d}-{m}" for d in ("window", "lam")
                                             for m in ("dgl+mlaan", "dgl+mlm", "dgl+lam"))])
def test_emulate_delay_delays_one_staleness_at_a_time(runs):
    """pipeline.emulate_delay=window delays window gradients alone, =lam LAM snapshots alone
    (how the cost of each is told apart, docs/method.md#async-staleness): on a method without
    the other staleness each one equals the whole emulation, and without its own it is the
    single process, bit for bit; on MLAAN each is a run of its own."""
    single = runs.get("ref-async-single")
    both = runs.get("emulate-4-mb2")
    for m, only in (("dgl+mlm", "window"), ("dgl+lam", "lam")):
        other = "lam" if only == "window" else "window"
        ref = runs.get(f"ref-async-single-{m}")
        assert_params_identical(runs.get(f"emulate-4-mb2-{other}-{m}"), ref, K)
        assert states_differ(runs.get(f"emulate-4-mb2-{only}-{m}"), ref, K), (m, only)
    window, lam = (runs.get(f"emulate-4-mb2-{d}-dgl+mlaan") for d in ("window", "lam"))
    for a, b in ((window, single), (window, both), (lam, single), (lam, both), (window, lam)):
        assert states_differ(a, b, K), (a.key, b.key)


@pytest.mark.parametrize("ranks,microbatches", LOCAL_FIRST_CASES,
                         ids=[f"{n}ranks-mb{mb}" for n, mb in LOCAL_FIRST_CASES])
@needs(lambda ranks, microbatches: [f"async-{ranks}-mb{microbatches}-local",
                                    f"emulate-{ranks}-mb{microbatches}-local",
                                    f"async-{ranks}-mb{microbatches}"])
def test_local_first_changes_the_run_the_same_way_emulated(runs, ranks, microbatches):
    """pipeline.local_first (a late module's own losses step at once, its late windows with
    the next batch): the pipeline trains, differs from the plain async run, and its one-process
    emulation ends with the same weights bit for bit."""
    got = runs.get(f"async-{ranks}-mb{microbatches}-local")
    assert_params_identical(got, runs.get(f"emulate-{ranks}-mb{microbatches}-local"), K)
    assert got.losses() == runs.get(f"emulate-{ranks}-mb{microbatches}-local").losses()
    assert states_differ(got, runs.get(f"async-{ranks}-mb{microbatches}"), K)
    check_async_trains(got, ranks)


@needs(lambda: ["async-2-mb2-pred", "emulate-2-mb2-pred", "async-2-mb2"])
def test_weight_prediction_changes_the_run_the_same_way_emulated(runs):
    """pipeline.predict_weights moves the stale modules' forward weights along the momentum:
    the run changes, trains, and the one-process emulation still matches the pipeline."""
    pred = runs.get("async-2-mb2-pred")
    assert_params_identical(pred, runs.get("emulate-2-mb2-pred"), K)
    assert states_differ(pred, runs.get("async-2-mb2"), K)
    check_async_trains(pred, 2)


@needs(lambda: ["async-4-mb2-stale", "emulate-4-mb2-stale", "async-4-mb2"])
def test_stale_steps_change_the_run_the_same_way_emulated(runs):
    """pipeline.stale_lr / stale_momentum retune the late bodies' steps: the run changes,
    trains, and the one-process emulation retunes the same modules (equal bit for bit)."""
    got = runs.get("async-4-mb2-stale")
    assert_params_identical(got, runs.get("emulate-4-mb2-stale"), K)
    assert states_differ(got, runs.get("async-4-mb2"), K)
    check_async_trains(got, 4)


@pytest.mark.parametrize("ranks", [2, 3])
@needs(lambda ranks: ["ref-refplan", f"lock-refplan-{ranks}"])
def test_reference_plan_lockstep_equals_single_process(runs, ranks):
    """The default plan: modules 0 and 1 (the stem alone, then a block) have no head and
    learn through the first window, which covers modules 0-2 and crosses a rank boundary."""
    ref, got = runs.get("ref-refplan"), runs.get(f"lock-refplan-{ranks}")
    s = got.summary()
    assert s["per_module_test_error"][:2] == [None, None]
    assert s["final_train_loss_per_module"][:2] == [None, None]
    assert {k for _, k in ref.losses()} == {2, 3}
    assert_losses_match(ref, got, LOCK_STEPS, K)
    assert_params_match(ref, got, K)
    assert s["per_module_test_error"] == ref.summary()["per_module_test_error"]
    # modules 0 and 1 did learn, from the window alone
    cfg = load_config(None, REF_PLAN)
    _, start = build_local_modules(cfg, dataset_spec(cfg.data))
    final = ref.module_states(K)
    for k in (0, 1):
        init = start[k].state_dict()
        moved = [n for n, t in init.items() if n.startswith("body.") and t.is_floating_point()
                 and not torch.equal(t, final[k][n])]
        assert moved and all(n.startswith("body.") for n in final[k]), k


@needs(lambda: ["async-refplan-2", "emulate-refplan-2"])
def test_reference_plan_emulated_async_equals_the_pipeline(runs):
    assert_params_identical(runs.get("async-refplan-2"), runs.get("emulate-refplan-2"), K)


@needs(lambda: ["async-lam-4"])
def test_async_twins_follow_live_blocks_on_other_ranks(runs):
    """Every twin's live block sits on a later rank here. In async mode the owners' snapshots
    must reach the twin."""
    check_twins_follow_live_blocks(runs.get("async-lam-4"), ASYNC_LAM)


@needs(lambda: ["async-lam-4", "async-lam-4-again"])
def test_async_runs_do_not_depend_on_timing(runs):
    """Async staleness is fixed by the schedule (micro-batches in flight, the LAM lag), not
    by which message happens to arrive first: two runs give the same weights."""
    assert_params_identical(runs.get("async-lam-4"), runs.get("async-lam-4-again"), K)


@pytest.mark.parametrize("ranks", sorted({n for n, _ in ASYNC_CASES}))
@needs(lambda ranks: [f"async-{ranks}-mb{mb}" for n, mb in ASYNC_CASES if n == ranks])
def test_async_more_microbatches_keep_more_batches_in_flight(runs, ranks):
    """Every rank but the last holds the graphs of its unfinished batches until the next rank's
    window gradients arrive: with more microbatches in flight, more of them are alive."""
    mbs = sorted(mb for n, mb in ASYNC_CASES if n == ranks)
    summaries = [runs.get(f"async-{ranks}-mb{mb}").summary() for mb in mbs]
    for s in summaries:
        assert s["partition"] == summaries[0]["partition"] and len(s["activation_bytes"]) == ranks
    for fewer, more in zip(summaries, summaries[1:]):
        for r in range(ranks - 1):
            assert more["activation_bytes"][r] > fewer["activation_bytes"][r], \
                (r, [s["activation_bytes"] for s in summaries])
            assert more["peak_memory_bytes"][r] > fewer["peak_memory_bytes"][r]


# ---- per-rank metrics ----------------------------------------------------------------------
METRIC_RUNS = {"lockstep-2ranks": "lock-dgl+mlaan-2", "lockstep-4ranks": "lock-dgl+mlaan-4",
               "async-4ranks": "async-4-mb3", "async-2ranks": "async-2-mb2"}


@pytest.mark.parametrize("run", list(METRIC_RUNS))
@needs(lambda run: [METRIC_RUNS[run]])
def test_per_rank_metrics(runs, run):
    check_per_rank_metrics(runs.get(METRIC_RUNS[run]))


# ---- checkpoint and resume on another number of ranks --------------------------------------
@needs(lambda: ["resume-2-then-4", "ref-dgl+mlaan"])
def test_resume_with_more_ranks_equals_uninterrupted_run(runs):
    res = runs.get("resume-2-then-4")
    first = res.phases[0]
    # the 2-rank launch stopped after one epoch and left that checkpoint as its newest
    assert first["checkpoints"][-1] == f"step_{LOCK_STEPS_PER_EPOCH:08d}", first
    assert first["summary"] is not None
    s1 = first["summary"]
    assert s1["world_size"] == 2 and s1["steps"] == LOCK_STEPS_PER_EPOCH
    ref = runs.get("ref-dgl+mlaan")
    meta = json.loads((res.final_checkpoint() / "meta.json").read_text())
    assert meta["step"] == LOCK_STEPS and meta["world_size"] == 4
    s = res.summary()
    assert s["world_size"] == 4 and s["steps"] == LOCK_STEPS and s["epochs"] == LOCK_EPOCHS
    assert "resumed from" in res.stdout
    # ranks 2 and 3 exist only in the second launch: they logged the second epoch alone
    assert {r["step"] for r in res.train_lines() if r["rank"] in (2, 3)} == \
        set(range(LOCK_STEPS_PER_EPOCH + 1, LOCK_STEPS + 1))
    # the train lines of both launches (steps 1-8 on 2 ranks, 9-16 on 4) equal the reference
    assert_losses_match(ref, res, LOCK_STEPS, K)
    assert_params_match(ref, res, K)
    assert s["per_module_test_error"] == ref.summary()["per_module_test_error"]


# ---- data-parallel replicas ----------------------------------------------------------------
@pytest.mark.parametrize("layout", list(DP_LAYOUTS))
@pytest.mark.parametrize("method", DP_METHODS)
@needs(lambda method, layout: [f"ref-lr002-{method}", f"dp-{layout}-{method}"])
def test_replicas_lockstep_equal_single_process_at_same_global_batch(runs, method, layout):
    check_replicas_equal_single_process(runs.get(f"ref-lr002-{method}"),
                                        runs.get(f"dp-{layout}-{method}"), layout)


@needs(lambda: ["ref-lr002-bp", "dp-2x1-bp"])
def test_bp_replicas_are_data_parallel_bp(runs):
    ref, got = runs.get("ref-lr002-bp"), runs.get("dp-2x1-bp")
    s = got.summary()
    assert (s["world_size"], s["replicas"], s["stages"], s["K"]) == (2, 2, 1, 1)
    assert_losses_match(ref, got, LOCK_STEPS, 1, replicas=2)
    assert_params_match(ref, got, 1)
    assert s["per_module_test_error"] == ref.summary()["per_module_test_error"]


@needs(lambda: ["dp-2x2-dgl+mlaan"])
def test_replicas_really_split_the_batch(runs):
    """Negative control for the equality above."""
    check_replicas_split_the_batch(runs.get("dp-2x2-dgl+mlaan"))


@needs(lambda: ["dp-resume-2x2-then-1", "ref-lr002-dgl+mlaan"])
def test_replica_checkpoint_resumes_in_one_process(runs):
    res = runs.get("dp-resume-2x2-then-1")
    ref = runs.get("ref-lr002-dgl+mlaan")
    first = res.run_dir / "checkpoints" / f"step_{LOCK_STEPS_PER_EPOCH:08d}" / "meta.json"
    meta = json.loads(first.read_text())      # written by the 2 x 2 launch
    assert meta["replicas"] == 2 and meta["world_size"] == 4
    assert json.loads((res.final_checkpoint() / "meta.json").read_text())["world_size"] == 1
    assert "resumed from" in res.stdout
    assert_params_match(ref, res, K)
    assert res.summary()["per_module_test_error"] == ref.summary()["per_module_test_error"]


@needs(lambda: ["dp-2x2-async"])
def test_async_replicas_train_and_stay_identical(runs):
    res = runs.get("dp-2x2-async")
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


def test_evaluations_every_few_steps_on_an_async_pipeline(tmp_path):
    """train.eval_every_steps: an async 2-rank pipeline drains and evaluates within the epoch;
    each eval line has the training seconds so far (what time-to-accuracy curves read)."""
    res = run_ranks(["--data.name=synthetic", "--data.synthetic_size=256",
                     "--train.batch_size=32", "--train.epochs=1", "--train.eval_every_steps=3",
                     "--data.test_subset=64", "--run.progress=false", "--run.tensorboard=false",
                     "--pipeline.mode=async", f"--run.dir={tmp_path}", "--run.name=evals"], 2)
    evals = [r for r in res["metrics"] if r.get("kind") == "eval"]
    assert [r["step"] for r in evals] == [3, 6, 8]         # every 3 steps and the epoch's end
    times = [r["train_s"] for r in evals]
    assert times == sorted(times) and times[0] > 0
    assert res["summary"]["steps"] == 8
