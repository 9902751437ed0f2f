"""The pipeline schedule as data: every rank's ordered list of actions, and nothing else.

A pure function of the pipeline's shape (stages, replicas, which rank boundaries carry window
gradients, which LAM weights travel where), the mode and the batches in flight gives each rank
the actions of a training step, of the fill and drain around a run of steps, of an evaluation
pass, and of the LAM start and finish. The trainer executes these lists and decides no order of
its own; `engine/simulate.py` replays them under NCCL's and gloo's rules and proves that every
operation finds its partner (tests/test_schedule.py runs it over every supported shape).

Actions:
- `Post(ops)`: posts point-to-point operations, several at once as one group
  (`dist.batch_isend_irecv`, which NCCL progresses as one unit);
- `Wait(op)`: the host waits for one posted operation;
- `Compute(name, index)`: local work (load a batch, forward, window backward, evaluation, LAM
  EMA/pack); `consumes` / `produces` name the messages it reads and writes, and `collective`
  names the process group of the collectives it performs inside (replica gradient all-reduces);
- `Collective(group, name)`: a blocking collective of the whole group (checkpoint, evaluation
  and summary gathers, the barrier at exit);
- `StartCollective(group, name, index)` / `WaitCollective(...)`: a collective started without
  blocking and waited for later (the stop agreement, [Note: stop agreement]).

Every call a rank makes to another rank after start-up is one of these actions, emitted here
and executed by the trainer's one dispatcher (engine/trainer.py `_run`); `program` lists a
whole run's actions, which tests/test_order.py compares with what real runs do.

[Note: wire order] Each neighbouring pair (s, s+1) of a replica talks on a process group of its
own ("pipe:a-b"), and each LAM flow owner -> receiver on another ("lam:o>q"), so NCCL gives
every pair its own communicator, and with it its own in-order stream, whatever torch's rules
for sharing communicators are. On a pair's group, both ranks post their operations in one
order, the *wire order*: with M batches in flight, rank s sends F(t) and then receives the
window gradients G(t-M+1); rank s+1 receives F(t+M) in the same group as it sends G(t). So
F(u+M-1) always precedes G(u) on both ends, and receives for the next batches are posted
before this batch's compute (rank s+1 holds up to M activations it has not yet used). Runs of
steps end with a drain (the last gradients), so evaluation batches E(i), which follow on the
same group, never cross a training message.

The old order (rank s posted F(t+1) before receiving G(t) while rank s+1 sent G(t) before
receiving F(t+1), each as its own operation on one communicator) is the negative control in
tests/test_schedule.py: the simulator reports it as a deadlock under NCCL's rules.

[Note: stop agreement] A preempted job (SIGTERM, SIGUSR1: engine/preempt.py) must stop every
rank after the same step, with a checkpoint there. At every step boundary c (after step c-1,
c < the run's end) each rank starts round c of a non-blocking all-reduce on the "stop" group
(gloo on the host, even in NCCL runs): did this rank receive a stop signal? It waits for round
c-D at boundary c, D = `PipeSpec.stop_delay` steps later. Ranks reach a boundary at different
times (an async rank 0 runs ahead), but never more than D-1 steps apart, so the wait finds the
round complete and never holds the pipeline up. Every rank learns round r's answer at the same
boundary f = r + D; a "stop" there ends the run after step b' - 1, b' = f + L
(`PipeSpec.stop_lead`): with the run's end moved to b', every action of steps before f is the
one it would have been anyway (receives are posted at most M steps ahead, LAM receives at most
lam_sync_every), so the whole run is exactly `program` with total_steps = b' and a stop at b',
which the simulator proves like any other run. Then: drain, checkpoint at b', LAM finish, the
rounds still in flight, the barrier at exit.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

FWD, GRAD, EVAL, LAM = "fwd", "grad", "eval", "lam"
WORLD = "world"
STOP = "stop"        # the stop agreement's rounds ([Note: stop agreement]); gloo on the host


# ---- actions ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Msg:
    """One message: a training batch's activations (FWD) or window gradients (GRAD), an
    evaluation batch (EVAL), or a LAM snapshot of sync step `index` (LAM)."""
    kind: str
    index: int
    src: int
    dst: int

    def __str__(self) -> str:
        return f"{self.kind}[{self.index}] {self.src}->{self.dst}"


@dataclass(frozen=True)
class Op:
    """One side of a message: the sender's or the receiver's."""
    send: bool
    msg: Msg
    group: str

    @property
    def peer(self) -> int:
        return self.msg.dst if self.send else self.msg.src

    def __str__(self) -> str:
        return f"{'send' if self.send else 'recv'} {self.msg} on {self.group}"


@dataclass(frozen=True)
class Post:
    ops: tuple[Op, ...]

    def __str__(self) -> str:
        return "post {" + ", ".join(map(str, self.ops)) + "}"


@dataclass(frozen=True)
class Wait:
    op: Op

    def __str__(self) -> str:
        return f"wait {self.op}"


@dataclass(frozen=True)
class Compute:
    name: str
    index: int
    consumes: tuple[Msg, ...] = ()
    produces: tuple[Msg, ...] = ()
    collective: str | None = None

    def __str__(self) -> str:
        return f"{self.name}[{self.index}]"


@dataclass(frozen=True)
class Collective:
    group: str
    name: str

    def __str__(self) -> str:
        return f"{self.name} on {self.group}"


@dataclass(frozen=True)
class _Round:
    """Round `index` of a non-blocking collective ([Note: stop agreement])."""
    group: str
    name: str
    index: int

    def __str__(self) -> str:
        return f"{self.verb} {self.name} {self.index} on {self.group}"


class StartCollective(_Round):
    """Starts the round without blocking."""
    verb = "start"


class WaitCollective(_Round):
    """Waits for the round, started earlier by a `StartCollective` of this rank."""
    verb = "wait"


Action = Post | Wait | Compute | Collective | StartCollective | WaitCollective
STOP_ROUND = "stop?"


# ---- the pipeline's shape --------------------------------------------------------------------
@dataclass(frozen=True)
class PipeSpec:
    """What the schedule depends on. `grads[b]`: window gradients that cross the boundary
    between stages b and b+1 (0: none); `lam_flows`: (owner stage, receiver stage) pairs of
    LAM weights, within each replica; `twin_stages`: stages holding EMA twins (they take an
    EMA step at the start of every step)."""
    stages: int
    replicas: int = 1
    lockstep: bool = True
    in_flight: int = 1
    grads: tuple[int, ...] = ()
    lam_flows: tuple[tuple[int, int], ...] = ()
    twin_stages: tuple[int, ...] = ()
    lam_every: int = 1
    total_steps: int = 0

    def __post_init__(self):
        assert len(self.grads) == max(self.stages - 1, 0), "one gradient count per boundary"
        assert self.in_flight >= 1 and (not self.lockstep or self.in_flight == 1)

    @property
    def world(self) -> int:
        return self.stages * self.replicas

    def rank_of(self, replica: int, stage: int) -> int:
        return replica * self.stages + stage

    def lam_lag(self, owner: int, receiver: int) -> int:
        """Steps between an owner stage's snapshot and the receiver's step that uses it: the
        upstream rank runs that far ahead in async mode (engine/lam.py)."""
        return 0 if self.lockstep else (owner - receiver) * self.in_flight

    @property
    def stop_delay(self) -> int:
        """D of [Note: stop agreement]: steps between starting a stop round and waiting for it,
        more than two ranks of a replica can be apart. Under NCCL's rules rank s finishes step
        t + M only once rank s+1 has posted the receive of F(t), at its step t - M: at most 2M
        steps per boundary (replicas meet at every optimizer step). Under gloo, whose sends do
        not wait, a faster upstream rank could run further ahead; the wait then holds it back
        to D steps, which no downstream rank needs."""
        return 2 * self.in_flight * (self.stages - 1) + 2

    @property
    def stop_lead(self) -> int:
        """L of [Note: stop agreement]: the stop lands this many steps after the boundary where
        it is agreed, past every receive already posted (activations M steps ahead, LAM
        snapshots up to a sync interval ahead)."""
        if self.stages == 1:
            return 0
        return max(self.in_flight, self.lam_every if self.lam_flows else 1)

    def with_end(self, total_steps: int) -> "PipeSpec":
        """The same pipeline with the run's end moved (a stop agreed at an earlier step)."""
        return replace(self, total_steps=total_steps)


def pipe_group(a: int, b: int) -> str:
    return f"pipe:{min(a, b)}-{max(a, b)}"


def lam_group(owner: int, receiver: int) -> str:
    return f"lam:{owner}>{receiver}"


def stage_group(stage: int) -> str:
    return f"stage:{stage}"


def process_groups(spec: PipeSpec) -> dict[str, tuple[int, ...]]:
    """Every process group the schedule uses, with its global ranks, in creation order (every
    rank creates every group, in this order, as torch.distributed requires)."""
    groups: dict[str, tuple[int, ...]] = {WORLD: tuple(range(spec.world))}
    if spec.world > 1:
        groups[STOP] = tuple(range(spec.world))
    if spec.replicas > 1:
        for s in range(spec.stages):
            groups[stage_group(s)] = tuple(spec.rank_of(r, s) for r in range(spec.replicas))
    for r in range(spec.replicas):
        for s in range(spec.stages - 1):
            a, b = spec.rank_of(r, s), spec.rank_of(r, s + 1)
            groups[pipe_group(a, b)] = (a, b)
        for o, q in spec.lam_flows:
            go, gq = spec.rank_of(r, o), spec.rank_of(r, q)
            groups[lam_group(go, gq)] = (min(go, gq), max(go, gq))
    return groups


def pipe_spec(plan, placement, *, lockstep: bool, in_flight: int, lam_every: int,
              total_steps: int) -> PipeSpec:
    """The schedule's view of a configured run: `plan` is the window plan, `placement`
    (engine/placement.py) where modules, blocks and twins live."""
    grads = []
    for s in range(placement.stages - 1):
        last = placement.modules_of(s)[-1]
        grads.append(sum(1 for j in plan.covering(last) if j > last))
    return PipeSpec(stages=placement.stages, replicas=placement.replicas, lockstep=lockstep,
                    in_flight=1 if lockstep else in_flight, grads=tuple(grads),
                    lam_flows=placement.lam_flows, twin_stages=placement.twin_stages,
                    lam_every=lam_every, total_steps=total_steps)


# ---- one rank's actions ----------------------------------------------------------------------
@dataclass
class RankSchedule:
    """The actions of one rank. `start` is the run's first step (0, or where it resumed);
    `nonfinite_stop`: checkpoints first agree on non-finite steps (train.nonfinite=stop)."""
    spec: PipeSpec
    rank: int
    start: int = 0
    nonfinite_stop: bool = False
    replica: int = field(init=False)
    stage: int = field(init=False)

    def __post_init__(self):
        self.replica, self.stage = divmod(self.rank, self.spec.stages)
        sp, s = self.spec, self.stage
        self.prev = self.rank - 1 if s > 0 else None
        self.next = self.rank + 1 if s < sp.stages - 1 else None
        self.grads_in = sp.grads[s] if self.next is not None else 0      # from the next rank
        self.grads_out = sp.grads[s - 1] if self.prev is not None else 0  # to the previous
        self.collective = stage_group(s) if sp.replicas > 1 else None
        self.owners = sorted(o for o, q in sp.lam_flows if q == s)     # stages we follow
        self.receivers = sorted(q for o, q in sp.lam_flows if o == s)  # stages that follow us

    # -- naming the operations
    def _op(self, send: bool, kind: str, index: int, peer: int, group: str) -> Op:
        src, dst = (self.rank, peer) if send else (peer, self.rank)
        return Op(send, Msg(kind, index, src, dst), group)

    def _pipe(self, send: bool, kind: str, index: int, peer: int) -> Op:
        return self._op(send, kind, index, peer, pipe_group(self.rank, peer))

    def _lam(self, send: bool, index: int, stage: int) -> Op:
        peer = self.spec.rank_of(self.replica, stage)
        owner, receiver = (self.rank, peer) if send else (peer, self.rank)
        return self._op(send, LAM, index, peer, lam_group(owner, receiver))

    # -- LAM sync steps
    def _is_sync(self, t: int) -> bool:
        return t % self.spec.lam_every == 0 and t < self.spec.total_steps

    def _next_sync(self, t: int) -> int | None:
        t += (-t) % self.spec.lam_every
        return t if t < self.spec.total_steps else None

    def _lam_due(self, owner: int, t: int) -> int | None:
        """The owner's snapshot the receiver takes at step t (engine/lam.py): published at
        sync step t - lag."""
        u = t - self.spec.lam_lag(owner, self.stage)
        return u if u >= 0 and self._is_sync(u) else None

    def _lam_first(self, owner: int, receiver: int) -> int:
        """The first snapshot of this run on the flow owner -> receiver: a resumed run's first
        steps take snapshots published up to `lag` steps before its start, which the owner
        publishes again from its history (engine/lam.py)."""
        return max(0, self.start - self.spec.lam_lag(owner, receiver))

    def _lam_keep(self, receiver: int) -> int:
        """LAM sends an owner leaves outstanding per receiver (it waits for older ones)."""
        return 0 if self.spec.lockstep else self.spec.lam_lag(self.stage, receiver) + 2

    # -- training
    def lam_start(self) -> list[Action]:
        """Before the run's first step: publish the snapshots the first steps take (the start
        weights; after a resume, those published up to `lag` steps before the start), post the
        first receives."""
        if self.start >= self.spec.total_steps:
            return []
        acts: list[Action] = []
        first = {q: self._lam_first(self.stage, q) for q in self.receivers}
        for u in sorted({u for q in self.receivers for u in range(first[q], self.start + 1)
                         if self._is_sync(u)}):
            acts += self._publish(u, [q for q in self.receivers if first[q] <= u])
        for o in self.owners:
            t = self._next_sync(self._lam_first(o, self.stage))
            if t is not None:
                acts.append(Post((self._lam(False, t, o),)))
        return acts

    def step(self, t: int, a: int, b: int) -> list[Action]:
        """Training step t of the run of steps [a, b) (a drain follows step b-1)."""
        M, acts = self.spec.in_flight, []
        if t - M >= a:
            # batch t-M's sends read its receive slot, which this step's receive of F(t+M)
            # reuses: they must be done first (on GPUs the two run on different streams)
            acts += self._reap(t - M)
        if t == a and self.prev is not None:        # the fill: the first M receives
            for u in range(a, min(a + M, b)):
                acts.append(Post((self._pipe(False, FWD, u, self.prev),)))
        acts += self._lam_before(t)
        consumes = ()
        if self.prev is None:
            acts.append(Compute("load", t))
        else:
            recv = self._pipe(False, FWD, t, self.prev)
            acts.append(Wait(recv))
            consumes = (recv.msg,)
        produces = []
        if self.next is not None:
            produces.append(Msg(FWD, t, self.rank, self.next))
        if self.grads_out:
            produces.append(Msg(GRAD, t, self.rank, self.prev))
        acts.append(Compute("step", t, consumes, tuple(produces), self.collective))
        if self.prev is not None:
            ops = []
            if self.grads_out:
                ops.append(self._pipe(True, GRAD, t, self.prev))
            if t + M < b:
                ops.append(self._pipe(False, FWD, t + M, self.prev))
            if ops:
                acts.append(Post(tuple(ops)))
        if self.next is not None:
            ops = [self._pipe(True, FWD, t, self.next)]
            u = t - M + 1
            if self.grads_in and u >= a:
                ops.append(self._pipe(False, GRAD, u, self.next))
            acts.append(Post(tuple(ops)))
            if len(ops) > 1:
                acts += self._backward(u)
        acts += self._publish(t + 1)
        acts += self._stop_round(t + 1)
        return acts

    def _stop_round(self, c: int) -> list[Action]:
        """At boundary c: wait for stop round c - D, start round c ([Note: stop agreement])."""
        acts: list[Action] = []
        if c - self.spec.stop_delay > self.start:
            acts.append(WaitCollective(STOP, STOP_ROUND, c - self.spec.stop_delay))
        if c < self.spec.total_steps:
            acts.append(StartCollective(STOP, STOP_ROUND, c))
        return acts

    def drain(self, a: int, b: int) -> list[Action]:
        """After step b-1: the window gradients still owed, then every send of the run."""
        M, acts = self.spec.in_flight, []
        for u in range(max(a, b - M + 1), b):
            if self.grads_in:
                acts.append(Post((self._pipe(False, GRAD, u, self.next),)))
                acts += self._backward(u)
        for u in range(max(a, b - M), b):
            acts += self._reap(u)
        return acts

    def _backward(self, u: int) -> list[Action]:
        recv = self._pipe(False, GRAD, u, self.next)
        return [Wait(recv), Compute("backward", u, (recv.msg,), (), self.collective)]

    def _reap(self, u: int) -> list[Action]:
        acts = []
        if self.next is not None:
            acts.append(Wait(self._pipe(True, FWD, u, self.next)))
        if self.grads_out:
            acts.append(Wait(self._pipe(True, GRAD, u, self.prev)))
        return acts

    def _lam_before(self, t: int) -> list[Action]:
        acts, got = [], []
        for o in self.owners:
            u = self._lam_due(o, t)
            if u is None:
                continue
            recv = self._lam(False, u, o)
            acts.append(Wait(recv))
            got.append(recv.msg)
            if self._is_sync(u + self.spec.lam_every):
                acts.append(Post((self._lam(False, u + self.spec.lam_every, o),)))
        if self.stage in self.spec.twin_stages:
            acts.append(Compute("lam_ema", t, tuple(got)))
        return acts

    def _publish(self, t: int, receivers: list[int] | None = None) -> list[Action]:
        """After step t-1, owners send the weights step t's receivers will follow."""
        qs = self.receivers if receivers is None else receivers
        if not qs or not self._is_sync(t):
            return []
        acts: list[Action] = [Compute("lam_pack", t, (), tuple(
            self._lam(True, t, q).msg for q in qs))]
        for q in qs:
            acts.append(Post((self._lam(True, t, q),)))
            old = t - (self._lam_keep(q) + 1) * self.spec.lam_every
            if old >= self._lam_first(self.stage, q) and self._is_sync(old):
                acts.append(Wait(self._lam(True, old, q)))
        return acts

    def finish(self, end: int) -> list[Action]:
        """After the run's last step `end - 1`: every LAM snapshot still on its way, every LAM
        send, and the stop rounds not yet waited for."""
        acts: list[Action] = []
        if self.start < end:
            acts += self._lam_finish(end)
        D = self.spec.stop_delay
        for r in range(max(self.start + 1, end - D + 1), end):
            acts.append(WaitCollective(STOP, STOP_ROUND, r))
        return acts

    def _lam_finish(self, end: int) -> list[Action]:
        acts: list[Action] = []
        for o in self.owners:
            # the receives taken during the run were for steps <= end-1-lag; the rest follow
            u = self._next_sync(max(0, end - self.spec.lam_lag(o, self.stage)))
            while u is not None:
                acts.append(Wait(self._lam(False, u, o)))
                nxt = u + self.spec.lam_every
                if self._is_sync(nxt):
                    acts.append(Post((self._lam(False, nxt, o),)))
                u = self._next_sync(nxt)
        for q in self.receivers:
            keep = self._lam_keep(q)
            for u in range(self._lam_first(self.stage, q), end):
                if self._is_sync(u) and u + (keep + 1) * self.spec.lam_every >= end:
                    acts.append(Wait(self._lam(True, u, q)))
        return acts

    # -- checkpoints, the end, and every event's actions
    def checkpoint(self, step: int) -> list[Action]:
        """A checkpoint at `step` (checkpoint_files.py writes the files, the trainer's dispatcher
        runs the collectives): agree that every update was finite (train.nonfinite=stop),
        write this rank's module files, gather every rank's checksums (or its error), rank 0
        writes meta.json, and no rank goes on before it is there."""
        acts: list[Action] = []
        if self.nonfinite_stop:
            acts.append(Collective(WORLD, "agree on non-finite steps"))
        acts += [Compute("write_checkpoint", step), Collective(WORLD, "gather checkpoint files")]
        if self.rank == 0:
            acts.append(Compute("write_meta", step))
        acts.append(Collective(WORLD, "barrier"))
        return acts

    def actions(self, ev: "Event", eval_batches: int) -> list[Action]:
        """The actions of one event of the run's course (the trainer runs a "train" event's
        steps one at a time: `step`, then `drain`)."""
        if ev.kind == "train":
            acts: list[Action] = []
            for t in range(ev.a, ev.b):
                acts += self.step(t, ev.a, ev.b)
            return acts + self.drain(ev.a, ev.b)
        if ev.kind == "eval":
            return self.evaluate(eval_batches)
        if ev.kind == "checkpoint":
            return self.checkpoint(ev.a)
        if ev.kind == "finish":
            return self.finish(ev.a)
        if ev.kind == "summary":
            return [Collective(WORLD, "gather summary"), Collective(WORLD, "barrier at exit")]
        if ev.kind == "preempted":
            return [Collective(WORLD, "barrier at exit")]
        raise ValueError(f"unknown event {ev.kind!r}")

    # -- evaluation
    def evaluate(self, n_batches: int) -> list[Action]:
        """Streams this replica's evaluation batches (every D-th from the replica's index)."""
        mine = list(range(self.replica, n_batches, self.spec.replicas))
        acts: list[Action] = []
        if self.prev is not None and mine:
            acts.append(Post((self._pipe(False, EVAL, mine[0], self.prev),)))
        for n, i in enumerate(mine):
            if self.next is not None and n >= 1:
                # the batch before's send reads the receive slot the next receive may reuse
                acts.append(Wait(self._pipe(True, EVAL, mine[n - 1], self.next)))
            consumes = ()
            if self.prev is None:
                acts.append(Compute("load_eval", i))
            else:
                recv = self._pipe(False, EVAL, i, self.prev)
                acts.append(Wait(recv))
                consumes = (recv.msg,)
                if n + 1 < len(mine):
                    acts.append(Post((self._pipe(False, EVAL, mine[n + 1], self.prev),)))
            produces = (Msg(EVAL, i, self.rank, self.next),) if self.next is not None else ()
            acts.append(Compute("eval", i, consumes, produces))
            if self.next is not None:
                acts.append(Post((self._pipe(True, EVAL, i, self.next),)))
        if self.next is not None and mine:
            acts.append(Wait(self._pipe(True, EVAL, mine[-1], self.next)))
        acts.append(Collective(WORLD, "gather evaluation counts"))
        return acts


# ---- the run's course ------------------------------------------------------------------------
@dataclass(frozen=True)
class Event:
    """One piece of a run, in order: "train" (steps [a, b), then a drain), "eval",
    "checkpoint" (at step a), "finish" (LAM flows and stop rounds, after the last step a),
    then "summary" or, for a run stopped by [Note: stop agreement], "preempted" (at a)."""
    kind: str
    a: int = 0
    b: int = 0


def run_events(*, steps_per_epoch: int, total_steps: int, start: int, eval_every: int,
               checkpoint_every: int, checkpoint_steps: int, stop_at: int | None = None,
               eval_first: bool = False, eval_steps: int = 0) -> list[Event]:
    """The course of a run from step `start`: runs of steps cut at epoch ends and at mid-epoch
    checkpoints (every `checkpoint_steps`) and evaluations (every `eval_steps`), evaluations
    and checkpoints where the config asks for them. `stop_at`: the run stops after step
    stop_at - 1 with a checkpoint there and no evaluation (a stop agreed by every rank).
    `eval_first`: evaluate before anything else (a run resumed from a stop at an epoch's end
    evaluates that epoch)."""
    end = total_steps if stop_at is None else min(stop_at, total_steps)
    stopped = end < total_steps
    events = [Event("eval", start)] if eval_first and start < end else []
    step, evaluated = start, False
    while step < end:
        epoch = step // steps_per_epoch
        epoch_end = (epoch + 1) * steps_per_epoch
        run_end = min(epoch_end, end)
        a = step
        for c in _cuts(a, run_end, checkpoint_steps, eval_steps):
            events.append(Event("train", a, c))
            if eval_steps and c % eval_steps == 0:
                events.append(Event("eval", c))
            if checkpoint_steps and c % checkpoint_steps == 0:
                events.append(Event("checkpoint", c))
            a = c
        events.append(Event("train", a, run_end))
        step = run_end
        if stopped:
            if step == end:
                events.append(Event("checkpoint", step))
                break
            if step == epoch_end and (epoch + 1) % eval_every == 0:
                events.append(Event("eval", step))
            if step == epoch_end and (epoch + 1) % checkpoint_every == 0:
                events.append(Event("checkpoint", step))
            continue
        last = step >= end
        if step == epoch_end:
            if (epoch + 1) % eval_every == 0 or last:
                events.append(Event("eval", step))
                evaluated = True
            if (epoch + 1) % checkpoint_every == 0 or last:
                events.append(Event("checkpoint", step))
        elif last:
            events += [Event("eval", step), Event("checkpoint", step)]
            evaluated = True
    events.append(Event("finish", step))
    if stopped:
        events.append(Event("preempted", step))
        return events
    if not evaluated:        # resumed a finished run: evaluate what it holds
        events.append(Event("eval", step))
    events.append(Event("summary", step))
    return events


def _cuts(a: int, b: int, *every: int) -> list[int]:
    """The steps strictly between a and b that are multiples of any non-zero `every`."""
    return sorted({c for n in every if n for c in range((a // n + 1) * n, b, n)})


def program(sched: RankSchedule, events: list[Event], eval_batches: int) -> list[Action]:
    """Every action of one rank over a whole run, in order: what the simulator replays, and
    exactly what the trainer executes (it asks for the same pieces as the run goes)."""
    acts = sched.lam_start()
    for ev in events:
        acts += sched.actions(ev, eval_batches)
    return acts
