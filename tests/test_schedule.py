"""The pipeline schedule is safe by construction: replayed under NCCL's and gloo's rules
(engine/simulate.py), every rank's action list runs to its end, every message meets the
receive that expects it, and nothing is used before it arrives, for every supported shape:
lockstep and async with 1-3 batches in flight, 2-4 stages (K=8), every method, windows 2 and 3,
replicas 1 and 2, LAM sync every 1 or 2 steps; 5 and 8 stages (K=16: DGL, DGL+MLM,
DGL+MLAAN, InfoPro+MLAAN, windows 2 and 3, replicas 1 and 2, LAM sync every step); evaluation,
fill and drain, mid-epoch checkpoints, and a resumed run. sync_bn adds all-reduces only inside a stage's compute segments,
which the schedule already marks as collectives on the stage's replica group (every replica
runs them in the same order, with no point-to-point operation between them), so the replica
cases cover it. The negative control: the order the trainer
used before the schedule became data deadlocks under NCCL (and only there).

Run: cd /work/main && .venv/bin/python -m pytest tests/test_schedule.py -q
"""

from __future__ import annotations

import itertools

import pytest

from pipemlaan.config import load_config, method_flags
from pipemlaan.data import dataset_spec
from pipemlaan.engine.partition import balanced_partition, window_spans
from pipemlaan.engine.placement import Placement
from pipemlaan.engine.schedule import (FWD, GRAD, WORLD, Compute, Msg, Op, PipeSpec, Post,
                                       RankSchedule, Wait, pipe_spec, program, run_events)
from pipemlaan.engine.simulate import simulate, simulate_run
from pipemlaan.local.module import build_local_modules, window_plan

METHODS = {m: method_flags(m) for m in ("bp", "dgl", "dgl+mlm", "dgl+lam", "dgl+mlaan",
                                         "infopro+mlaan")}
K = 8
STEPS_PER_EPOCH, EPOCHS = 5, 2
TOTAL = STEPS_PER_EPOCH * EPOCHS

_modules_cache: dict = {}


def _modules(method: str, window: int, ema_only_last: bool = False):
    key = (method, window, ema_only_last)
    if key not in _modules_cache:
        cfg = load_config(None, [*METHODS[method], "--data.name=synthetic",
                                 "--data.synthetic_image=[3,8,8]", "--model.name=resnet20",
                                 f"--model.K={K}", f"--method.window={window}",
                                 f"--method.ema_only_last={str(ema_only_last).lower()}"])
        _, modules = build_local_modules(cfg, dataset_spec(cfg.data))
        _modules_cache[key] = (window_plan(cfg, len(modules)), modules)
    return _modules_cache[key]


def spec_for(method, window, stages, replicas, lockstep, in_flight, lam_every=1,
             ema_only_last=False) -> PipeSpec:
    plan, modules = _modules(method, window, ema_only_last)
    parts = balanced_partition([1.0] * len(modules), stages, window_spans(plan))
    placement = Placement.of(parts, replicas, modules, ema_only_last)
    return pipe_spec(plan, placement, lockstep=lockstep, in_flight=in_flight,
                     lam_every=lam_every, total_steps=TOTAL)


def events(start=0, checkpoint_steps=3):
    return run_events(steps_per_epoch=STEPS_PER_EPOCH, total_steps=TOTAL, start=start,
                      eval_every=1, checkpoint_every=1, checkpoint_steps=checkpoint_steps)


def _shapes():
    """Every (method, window, stages, replicas) the trainer accepts, in the test's sizes."""
    for method, window, stages, replicas in itertools.product(
            METHODS, (2, 3), (1, 2, 3, 4), (1, 2)):
        if method == "bp" and (stages > 1 or window == 3):
            continue
        if window == 3 and "mlm" not in method and "mlaan" not in method:
            continue          # the window only matters with MLM
        if stages == 1 and replicas == 1:
            continue          # a single process: nothing to schedule
        yield method, window, stages, replicas


@pytest.mark.parametrize("mode", ["lockstep", "async-1", "async-2", "async-3"])
def test_every_shape_is_deadlock_free_under_nccl_and_gloo(mode):
    lockstep = mode == "lockstep"
    in_flight = 1 if lockstep else int(mode.split("-")[1])
    checked = 0
    for method, window, stages, replicas in _shapes():
        for lam_every in (1, 2):
            spec = spec_for(method, window, stages, replicas, lockstep, in_flight, lam_every)
            for rules in ("nccl", "gloo"):
                res = simulate_run(spec, events(), eval_batches=3, rules=rules)
                assert res.ok, f"{method} W={window} {stages}x{replicas} {mode} " \
                               f"lam_every={lam_every}: {res.describe()}"
                checked += 1
    assert checked > 100


_deep_cache: dict = {}


def deep_spec(method, window, stages, replicas, lockstep, in_flight) -> PipeSpec:
    """The docs' deep shapes: ResNet-32 cut into K=16 modules over 5-8 stages."""
    key = (method, window)
    if key not in _deep_cache:
        cfg = load_config(None, [*METHODS[method], "--data.name=synthetic",
                                 "--data.synthetic_image=[3,8,8]", "--model.name=resnet32",
                                 "--model.K=16", f"--method.window={window}"])
        _, modules = build_local_modules(cfg, dataset_spec(cfg.data))
        _deep_cache[key] = (window_plan(cfg, len(modules)), modules)
    plan, modules = _deep_cache[key]
    parts = balanced_partition([1.0] * len(modules), stages, window_spans(plan))
    placement = Placement.of(parts, replicas, modules, False)
    return pipe_spec(plan, placement, lockstep=lockstep, in_flight=in_flight, lam_every=1,
                     total_steps=TOTAL)


@pytest.mark.parametrize("mode", ["lockstep", "async-1", "async-2", "async-3"])
def test_deep_pipelines_are_deadlock_free(mode):
    """5 and 8 stages (K=16), as docs/distributed.md launches: 2 replicas of 8 stages on two
    8-GPU nodes, 16 stages' worth of ranks in all."""
    lockstep = mode == "lockstep"
    in_flight = 1 if lockstep else int(mode.split("-")[1])
    checked = 0
    for method, window in (("dgl", 2), ("dgl+mlaan", 2), ("dgl+mlaan", 3),
                           ("infopro+mlaan", 2), ("dgl+mlm", 3)):
        for stages, replicas in itertools.product((5, 8), (1, 2)):
            spec = deep_spec(method, window, stages, replicas, lockstep, in_flight)
            for rules in ("nccl", "gloo"):
                res = simulate_run(spec, events(), eval_batches=3, rules=rules)
                assert res.ok, f"{method} W={window} {stages}x{replicas} {mode}: " \
                               f"{res.describe()}"
                checked += 1
    assert checked == 40


def test_the_shapes_exercise_gradients_lam_and_replicas():
    """The matrix above is only a proof if it contains the hard cases: window gradients that
    cross every boundary, LAM weights that travel two stages, replicas, sync_bn's collectives."""
    mlaan = spec_for("dgl+mlaan", 2, 4, 2, False, 2)
    assert all(g >= 1 for g in mlaan.grads) and mlaan.replicas == 2
    assert any(o - q >= 2 for o, q in mlaan.lam_flows), mlaan.lam_flows
    w3 = spec_for("dgl+mlm", 3, 4, 1, True, 1)
    assert all(g == 2 for g in w3.grads), w3.grads     # windows 3: two gradients per boundary
    assert spec_for("dgl", 2, 3, 1, True, 1).grads == (0, 0)
    sched = RankSchedule(mlaan, 5)                          # replica 1, stage 1
    forwards = [a for a in sched.step(3, 0, TOTAL) if isinstance(a, Compute)
                and a.name == "step"]
    assert forwards[0].collective == "stage:1"   # replica all-reduces (and sync_bn) inside


def test_resumed_and_finished_runs_are_deadlock_free():
    spec = spec_for("infopro+mlaan", 2, 4, 1, False, 2, lam_every=2)
    for start in (3, 5, 7, TOTAL):
        for rules in ("nccl", "gloo"):
            res = simulate_run(spec, events(start), eval_batches=4, rules=rules, start=start)
            assert res.ok, f"start={start}: {res.describe()}"


def test_evaluations_every_few_steps_cut_the_epochs_and_stay_deadlock_free():
    """train.eval_every_steps: evaluations within epochs (time-to-accuracy curves), beside
    mid-epoch checkpoints, on an async pipeline that must drain before each."""
    ev = run_events(steps_per_epoch=STEPS_PER_EPOCH, total_steps=TOTAL, start=0, eval_every=1,
                    checkpoint_every=1, checkpoint_steps=3, eval_steps=2)
    evals = [e.a for e in ev if e.kind == "eval"]
    assert evals == [2, 4, 5, 6, 8, 10]      # every 2 steps, and every epoch's end
    assert [e.a for e in ev if e.kind == "checkpoint"] == [3, 5, 6, 9, 10]
    trains = [(e.a, e.b) for e in ev if e.kind == "train"]
    assert trains == [(0, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 8), (8, 9), (9, 10)]
    spec = spec_for("dgl+mlaan", 2, 3, 1, False, 2, lam_every=2)
    for rules in ("nccl", "gloo"):
        res = simulate_run(spec, ev, eval_batches=3, rules=rules)
        assert res.ok, res.describe()


# ---- the stop agreement ([Note: stop agreement]) ---------------------------------------------
LONG, LONG_EPOCH = 36, 12     # long enough for a stop after the rounds' delay D


def _stopped(spec, agreed_at: int):
    end = agreed_at + spec.stop_lead
    return spec.with_end(end), run_events(steps_per_epoch=LONG_EPOCH, total_steps=LONG,
                                          start=0, eval_every=1, checkpoint_every=1,
                                          checkpoint_steps=5, stop_at=end), end


@pytest.mark.parametrize("mode", ["lockstep", "async-2", "async-3"])
def test_stopped_runs_are_deadlock_free(mode):
    """A stop agreed at any boundary: the run with its end moved there, drain, checkpoint,
    LAM finish, the rounds in flight and the barrier at exit, under both rules."""
    lockstep = mode == "lockstep"
    M = 1 if lockstep else int(mode.split("-")[1])
    checked = 0
    for method, stages, replicas, lam_every in [("dgl+mlaan", 4, 1, 1), ("dgl+mlaan", 3, 2, 2),
                                                ("infopro+mlaan", 2, 1, 2), ("dgl", 3, 1, 1)]:
        spec = spec_for(method, 2, stages, replicas, lockstep, M, lam_every).with_end(LONG)
        for agreed_at in range(spec.stop_delay + 1, LONG - spec.stop_lead, 2):
            stopped, events, end = _stopped(spec, agreed_at)
            assert events[-1].kind == "preempted" and events[-1].a == end
            for rules in ("nccl", "gloo"):
                res = simulate_run(stopped, events, eval_batches=2, rules=rules,
                                   nonfinite_stop=True)
                assert res.ok, f"{method} {stages}x{replicas} {mode} stop at {end}: " \
                               f"{res.describe()}"
                checked += 1
    assert checked >= 10


@pytest.mark.parametrize("mode", ["lockstep", "async-2", "async-3"])
def test_a_stop_does_not_change_the_steps_before_it(mode):
    """Every rank learns of the stop at boundary f, after its steps up to f-1 ran under the
    old end: those steps' actions must be the ones the moved end gives, or the run would not
    be the program the simulator proves."""
    lockstep = mode == "lockstep"
    M = 1 if lockstep else int(mode.split("-")[1])
    spec = spec_for("dgl+mlaan", 2, 4, 1, lockstep, M, lam_every=2).with_end(LONG)
    for agreed_at in range(1, LONG - spec.stop_lead):
        stopped, _, end = _stopped(spec, agreed_at)
        for r in range(spec.world):
            before, after = RankSchedule(spec, r), RankSchedule(stopped, r)
            assert before.lam_start() == after.lam_start()
            for t in range(agreed_at):
                a = (t // LONG_EPOCH) * LONG_EPOCH
                b = min(a + LONG_EPOCH, LONG)
                assert before.step(t, a, b) == after.step(t, a, min(b, end)), \
                    f"rank {r} step {t} differs with the end moved to {end}"


def test_a_shorter_lead_would_change_the_past():
    """Negative control for the lead L: ending the run right at the boundary where the stop
    is agreed changes actions already taken (receives posted M steps ahead)."""
    spec = spec_for("dgl+mlaan", 2, 2, 1, False, 2)
    agreed_at = 7
    short = spec.with_end(agreed_at)
    before, after = RankSchedule(spec, 1), RankSchedule(short, 1)
    assert any(before.step(t, 5, 10) != after.step(t, 5, min(10, agreed_at))
               for t in range(5, agreed_at))


def test_ema_only_last_and_long_runs_are_deadlock_free():
    spec = spec_for("dgl+mlaan", 2, 4, 1, False, 3, ema_only_last=True)
    assert len(spec.lam_flows) <= 1
    res = simulate_run(spec, events(checkpoint_steps=0), eval_batches=2)
    assert res.ok, res.describe()


def test_wire_order_receives_next_batches_before_computing():
    """Rank s+1 posts the receive of F(t+M) together with its send of G(t), and its first M
    receives before the first forward: activations for the next batches are in flight while
    it computes."""
    spec = spec_for("dgl+mlaan", 2, 2, 1, False, 2)
    acts = RankSchedule(spec, 1).step(0, 0, TOTAL)
    posts = [a for a in acts if isinstance(a, Post)]
    first_forward = next(i for i, a in enumerate(acts) if isinstance(a, Compute)
                         and a.name == "step")
    fill = [op.msg.index for p in posts[:2] for op in p.ops]
    assert fill == [0, 1] and acts.index(posts[1]) < first_forward
    grouped = posts[2].ops
    assert {(op.send, op.msg.kind, op.msg.index) for op in grouped} == {(True, GRAD, 0),
                                                                        (False, FWD, 2)}


# ---- receive slots --------------------------------------------------------------------------
def slot_reuse_violations(acts, rank: int, in_flight: int) -> list[str]:
    """engine/p2p.py receives activations and evaluation batches into a ring of 2 x M slots, in
    posting order. Before a receive is posted into a slot, whatever read the batch that last
    used it must be done: this rank's send that forwards that batch (it reads the received
    labels and images) waited for, and the batch's window backward run (its graph reads the
    received activations). The simulator does not model buffers; this checks it here."""
    forwarded = {(op.msg.kind, op.msg.index) for a in acts if isinstance(a, Post)
                 for op in a.ops if op.send and op.msg.kind in (FWD, "eval")}
    backward_all = {a.index for a in acts if isinstance(a, Compute) and a.name == "backward"}
    ring, slots, bad, n = 2 * in_flight, {}, [], 0
    sent_done, backward_done = set(), set()
    for a in acts:
        if isinstance(a, Wait) and a.op.send:
            sent_done.add((a.op.msg.kind, a.op.msg.index))
        elif isinstance(a, Compute) and a.name == "backward":
            backward_done.add(a.index)
        elif isinstance(a, Post):
            for op in a.ops:
                if op.send or op.msg.kind not in (FWD, "eval"):
                    continue
                prev, slots[n % ring] = slots.get(n % ring), op.msg
                n += 1
                if prev is None:
                    continue
                key = (prev.kind, prev.index)
                if key in forwarded and key not in sent_done:
                    bad.append(f"rank {rank}: receiving {op.msg} into the slot of {prev} "
                               f"before its forwarded send was waited for")
                if prev.kind == FWD and prev.index in backward_all and \
                        prev.index not in backward_done:
                    bad.append(f"rank {rank}: receiving {op.msg} into the slot of {prev} "
                               f"before that batch's window backward")
            if len(bad) > 3:
                break
    return bad


@pytest.mark.parametrize("mode", ["lockstep", "async-2", "async-3"])
def test_no_receive_reuses_a_slot_still_being_read(mode):
    lockstep = mode == "lockstep"
    M = 1 if lockstep else int(mode.split("-")[1])
    spec = spec_for("infopro+mlaan", 2, 4, 1, lockstep, M)
    for r in range(spec.world):
        sched = RankSchedule(spec, r)
        acts = program(sched, events(), eval_batches=4)
        assert not slot_reuse_violations(acts, r, M), slot_reuse_violations(acts, r, M)


def test_slot_check_catches_sends_reaped_after_the_next_receive():
    """Negative control: the order this project ran before the check (batch t-M's sends
    waited at the end of step t, after step t had posted the receive into their slot)."""
    spec = spec_for("dgl+mlaan", 2, 3, 1, False, 2)
    sched = RankSchedule(spec, 1)
    acts = []
    for t in range(TOTAL):
        step = sched.step(t, 0, TOTAL)
        reaps = [a for a in step[:3] if isinstance(a, Wait) and a.op.send]
        acts += [a for a in step if a not in reaps] + reaps
    bad = slot_reuse_violations(acts, 1, 2)
    assert bad and "forwarded send" in bad[0], bad


# ---- the negative control -------------------------------------------------------------------
def _old_async_programs(stages: int, in_flight: int, steps: int, grads: bool = True):
    """The order the trainer used before: every operation on the default group, posted one at
    a time; rank s sent F(t) before receiving G(t-M+1), rank s+1 sent G(t) before receiving
    F(t+1) (each receive posted just before it was waited on)."""
    progs = {}
    for s in range(stages):
        acts, unfinished = [], []
        prev = s - 1 if s > 0 else None
        nxt = s + 1 if s < stages - 1 else None

        def op(send, kind, t, peer):
            src, dst = (s, peer) if send else (peer, s)
            return Op(send, Msg(kind, t, src, dst), WORLD)
        for t in range(steps):
            consumes = ()
            if prev is None:
                acts.append(Compute("load", t))
            else:
                r = op(False, FWD, t, prev)
                acts += [Post((r,)), Wait(r)]
                consumes = (r.msg,)
            produces = tuple(m for m in (Msg(FWD, t, s, nxt) if nxt is not None else None,
                                         Msg(GRAD, t, s, prev) if prev is not None and grads
                                         else None) if m is not None)
            acts.append(Compute("step", t, consumes, produces))
            if prev is not None and grads:
                acts.append(Post((op(True, GRAD, t, prev),)))
            if nxt is not None:
                acts.append(Post((op(True, FWD, t, nxt),)))
                if grads:
                    unfinished.append(t)
                while len(unfinished) >= in_flight:
                    u = unfinished.pop(0)
                    r = op(False, GRAD, u, nxt)
                    acts += [Post((r,)), Wait(r), Compute("backward", u, (r.msg,))]
        for u in unfinished:
            r = op(False, GRAD, u, nxt)
            acts += [Post((r,)), Wait(r), Compute("backward", u, (r.msg,))]
        progs[s] = acts
    return progs


def test_old_async_order_deadlocks_under_nccl_only():
    progs = _old_async_programs(stages=2, in_flight=2, steps=4)
    groups = {WORLD: (0, 1)}
    nccl = simulate(progs, groups, "nccl")
    assert not nccl.ok and nccl.deadlock, nccl.describe()
    ranks = {r for r, _, _ in nccl.deadlock}
    assert ranks == {0, 1}, nccl.describe()
    assert simulate(progs, groups, "gloo").ok        # why every CPU test passed
    # lockstep (one batch in flight) was ordered safely, and so was a pipeline without windows
    assert simulate(_old_async_programs(2, 1, 4), groups, "nccl").ok
    assert simulate(_old_async_programs(3, 2, 4, grads=False), {WORLD: (0, 1, 2)}, "nccl").ok
