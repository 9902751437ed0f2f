"""The training loop, the same on every rank and in a single process (a world of one rank).

`Trainer(cfg, env)` builds the rank (engine/setup.py: model, partition, transport, LAM, the
checkpoint it resumes from, the schedule); `train()` follows the run's course (engine/schedule.py
`run_events`: runs of steps, evaluations, checkpoints, the end) and executes, in order, the
actions the schedule gives each piece. Every action goes through one dispatcher, `_run`: posts
and waits to the transport (engine/p2p.py), compute actions to the stage (engine/stage.py), LAM
(engine/lam.py) and checkpoints (engine/checkpoint_state.py), collectives to their handlers here.
After start-up nothing else talks to another rank, so a run does exactly what
`schedule.program` lists (tests/test_order.py records real runs and compares). A stop agreed by
every rank (engine/preempt.py) moves the run's end and ends it with a checkpoint. Returns the
summary on rank 0 (None elsewhere, or when the run was preempted).
"""

from __future__ import annotations

import json
import time

import torch

from pipemlaan.config import Config, to_toml
from pipemlaan.engine import checkpoint_state
from pipemlaan.engine.distributed import DistEnv, barrier, gather_all
from pipemlaan.engine.compiled import compile_skip_reason
from pipemlaan.engine.graphs import GraphedStep, graph_skip_reason
from pipemlaan.engine.lr_schedule import lr_at
from pipemlaan.engine.preempt import StopRequest
from pipemlaan.engine.records import (banner_lines, rank_facts, summary, summary_part,
                                      train_record)
from pipemlaan.engine.schedule import (STOP, Collective, Compute, Post, RankSchedule,
                                       StartCollective, Wait, WaitCollective, run_events)
from pipemlaan.engine.setup import build
from pipemlaan.engine.spans import ActionSpans, measure_clock
from pipemlaan.engine.stage import NonFiniteLoss
from pipemlaan import provenance
from pipemlaan.checkpoint_files import write_meta
from pipemlaan.flops import best_measured_peaks
from pipemlaan.metrics import MetricsWriter, StepTracer, reset_peaks
from pipemlaan.trackers import open_trackers, scalars
from pipemlaan.ui import NullView, banner, console, progress_view, results_table


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, stop: StopRequest | None = None):
        self.cfg, self.env = cfg, env
        self.stop = stop or StopRequest()
        self.s = build(cfg, env)
        self.stage = self.s.stage
        self.sched: RankSchedule = self.s.schedule
        self.step = self.sched.start
        # still start-up, before any action: every rank's facts for the banner, the records
        # and this start's provenance (pipemlaan/provenance.py)
        self.ranks = best_measured_peaks(gather_all(env, rank_facts(self.s)))
        self.facts = self.ranks[env.rank]
        if env.rank == 0:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            provenance.write_start(cfg.run_dir, to_toml(cfg), provenance.collect(
                self.ranks, world=env.world, replicas=self.s.placement.replicas,
                stages=self.s.placement.stages, backend=env.backend))
        barrier(env)
        self.metrics = MetricsWriter(cfg.run_dir / "metrics.jsonl")
        self.tracker = open_trackers(cfg.run_dir, env.rank, tensorboard=cfg.run.tensorboard,
                                     wandb=cfg.run.wandb, start_step=self.step,
                                     name=cfg.run_name, config=cfg.to_dict())
        # every action's host times (engine/spans.py), on the clock of rank 0
        self.spans, self._at = ActionSpans(), self.step
        self.spans.clock = measure_clock(env)
        self._inputs: dict = {}        # batches the first stage loaded, by step / eval index
        self._batches = None
        self._lr = 0.0
        self._tracer = StepTracer(cfg.run.profile_steps, cfg.run_dir / "traces", env)
        # after resume: a captured graph must see the weights and optimizer state it updates
        self.graphed = (GraphedStep(self.stage) if graph_skip_reason(cfg, self.s) is None
                        else None)
        # start-up ends here: a rank's memory peak counts its own training from now on
        self.s.startup_memory = reset_peaks(env.device)
        self._train_step = self.graphed or self.stage.train_step
        self._eval_bs = cfg.train.batch_size // self.s.placement.replicas
        self.eval_batches = -(-self.s.test_samples // self._eval_bs)
        self._rounds: dict[int, tuple[torch.Tensor, object]] = {}    # stop rounds in flight
        self._gathered: dict = {}      # what this rank's collectives brought back, by name
        self._event = 0                # the index in self.events being executed
        self._compute = [0.0, 0]       # compute seconds and steps of the logged windows
        self.events = self._course(None)

    @property
    def epoch(self) -> int:
        return self.step // self.s.steps_per_epoch

    def _course(self, stop_at: int | None):
        s, cfg, start = self.s, self.cfg, self.sched.start
        # a run stopped at an epoch's end skipped that epoch's evaluation: do it first
        resumed = s.resumed or {}
        eval_first = bool(resumed.get("preempted")) and start % s.steps_per_epoch == 0
        return run_events(steps_per_epoch=s.steps_per_epoch, total_steps=s.total_steps,
                          start=start, eval_every=cfg.train.eval_every,
                          checkpoint_every=cfg.run.checkpoint_every,
                          checkpoint_steps=cfg.run.checkpoint_steps, stop_at=stop_at,
                          eval_steps=cfg.train.eval_every_steps,
                          eval_first=eval_first)

    # ---- the run's course ------------------------------------------------------------------
    def train(self) -> dict | None:
        cfg, s = self.cfg, self.s
        t_start = time.perf_counter()
        if self.env.rank == 0:
            banner(self._banner())
        view = (progress_view(cfg.run_dir / "metrics.jsonl", self.env.world, cfg.run_name)
                if self.env.rank == 0 and cfg.run.progress else NullView())
        train_time, images, result, out = 0.0, 0, None, None
        view.start(s.total_steps, self.step)
        try:
            if s.lam:
                s.lam.record(self.step)
            self._run(self.sched.lam_start())
            i = 0
            while i < len(self.events):      # a stop agreed during a run of steps moves its end
                ev, self._event = self.events[i], i
                self._at = self.step
                if ev.kind == "train":
                    t0 = time.perf_counter()
                    images += self._train_run(i, view)
                    train_time += time.perf_counter() - t0
                elif ev.kind == "eval":
                    result = self.evaluate()
                    self._log_eval(result, train_time)
                elif ev.kind == "summary":
                    self._summary_args = (result, train_time, images, t_start)
                    self._run(self.sched.actions(ev, self.eval_batches))
                    out = self._gathered.pop("summary", None)
                else:        # checkpoint, finish, preempted
                    if ev.kind == "finish":
                        self._tracer.at(None)
                    if ev.kind == "preempted":
                        self._log_preempted(ev.a)
                    self._run(self.sched.actions(ev, self.eval_batches))
                i += 1
        finally:
            view.stop()
        if out is not None:
            out["cuda_graph"] = self._graph_report()
            out["compile"] = self._compile_report()
            (cfg.run_dir / "summary.json").write_text(json.dumps(out, indent=1))
            console.print(results_table(out))
        return out

    def _train_run(self, i: int, view) -> int:
        """Steps [a, b) of events[i] and their drain; returns the images processed."""
        cfg, s = self.cfg, self.s
        a = self.events[i].a
        if s.is_first:
            self._batches = s.train_set.batches(
                cfg.train.batch_size, epoch=a // s.steps_per_epoch, seed=cfg.train.seed,
                train=True, start=a % s.steps_per_epoch,
                shard=(s.replica, s.placement.replicas))
        self.stage.train(True)
        window_t0, window_images = time.perf_counter(), 0
        s.clock.reset()
        t = a
        while t < self.events[i].b:
            self._tracer.at(t)
            self._at = t
            self._run(self.sched.step(t, a, self.events[i].b))
            b = self.events[i].b        # a stop agreed in that step may have moved it
            if s.lam:
                s.lam.record(t + 1)
            if t == b - 1:
                self._run(self.sched.drain(a, b))
                self.stage.flush_delayed()
            self.step = t = t + 1
            window_images += cfg.train.batch_size
            if self.step % cfg.run.log_every == 0 or self.step == self.sched.spec.total_steps:
                self._check_finite()
                elapsed = time.perf_counter() - window_t0
                record = train_record(s, s.clock, self.step, (t - 1) // s.steps_per_epoch,
                                      self._lr, window_images / elapsed, elapsed,
                                      self.facts)
                self._record(record)
                self._compute[0] += record["compute_s"]
                self._compute[1] += window_images // cfg.train.batch_size
                view.update(self.step, record if self.env.rank == 0 else {})
                window_t0, window_images = time.perf_counter(), 0
                s.clock.reset()
            elif self.env.rank == 0:
                view.update(self.step, {})
        return (self.events[i].b - a) * cfg.train.batch_size

    # ---- the dispatcher: every action of the schedule, and nothing else --------------------
    def _run(self, actions) -> None:
        tr, comm = self.s.transport, self.env.comm
        add, now, at = self.spans.add, time.perf_counter_ns, self._at
        for act in actions:
            if comm is not None:
                comm.doing(act)
            t0 = now()
            if isinstance(act, Post):
                tr.post(act.ops)
            elif isinstance(act, Wait):
                tr.wait(act.op)
            elif isinstance(act, Compute):
                getattr(self, "_do_" + act.name)(act)
            elif isinstance(act, Collective):
                self._collective(act.name)
            elif isinstance(act, StartCollective):
                self._start_round(act)
            elif isinstance(act, WaitCollective):
                self._wait_round(act)
            else:
                raise TypeError(f"unknown action {act!r}")
            add((t0, now(), at, act))
        if comm is not None:
            comm.doing(None)

    def _collective(self, name: str) -> None:
        """The schedule's blocking collectives, each one call on the world group."""
        if name == "gather evaluation counts":
            self._gathered["eval"] = gather_all(self.env, self._eval_counts)
        elif name == "agree on non-finite steps":
            self._check_finite(every_rank=True)
        elif name == "gather checkpoint files":
            parts = gather_all(self.env, self._gathered.pop("checkpoint"))
            merged = checkpoint_state.raise_first_error(parts, self.env.rank)
            if self.env.rank == 0:
                self._gathered["checksums"] = merged
        elif name == "gather summary":
            result, train_time, images, t_start = self._summary_args
            seconds, steps = self._compute
            parts = gather_all(self.env, summary_part(self.s, train_time, self.facts, images,
                                                      seconds / steps if steps else None))
            if self.env.rank == 0:
                self._gathered["summary"] = summary(self.s, parts, result, images,
                                                    time.perf_counter() - t_start, self.step,
                                                    self.epoch)
        elif name in ("barrier", "barrier at exit"):
            barrier(self.env)
        else:
            raise ValueError(f"no handler for the collective {name!r}")

    def _input(self, act: Compute, key) -> tuple:
        """(x, labels, images): received from the previous rank, or what `load` put here."""
        got = (self.s.transport.take(act.consumes[0]) if act.consumes
               else self._inputs.pop(key))
        return (*got, None)[:3]

    def _do_load(self, act: Compute) -> None:
        with self.s.clock.measure("data"):
            x, y = next(self._batches)
        self._inputs[act.index] = (x, y, x if self.cfg.method.name == "infopro" else None)

    def _do_step(self, act: Compute) -> None:
        """Batch act.index through this rank's modules: forward, heads, local backward,
        optimizer steps (engine/stage.py [Note: step order])."""
        x, y, images = self._input(act, act.index)
        self._lr = lr_at(act.index, self.s.steps_per_epoch, self.cfg.train)
        with self.s.clock.measure("compute"):
            out, upstream = self._train_step(act.index, self._lr, x, y, images)
        for msg in act.produces:
            if msg.dst > self.env.rank:
                self.s.transport.put_forward(msg, out, y, images)
            else:
                self.s.transport.put(msg, [self._stack(upstream)])

    def _stack(self, grads):
        # contiguous: channels-last gradients stack into a strided tensor, which neither NCCL
        # nor gloo sends
        return torch.stack(grads).to(self.s.transport.act_dtype).contiguous()

    def _do_backward(self, act: Compute) -> None:
        (grads,) = self.s.transport.take(act.consumes[0])
        assert self.stage.unfinished()[0] == act.index, "window gradients out of order"
        with self.s.clock.measure("compute"):
            self.stage.receive_grads(act.index, list(grads.unbind(0)))

    def _do_lam_ema(self, act: Compute) -> None:
        received = {m.src: self.s.transport.take(m)[0] for m in act.consumes}
        with self.s.clock.measure("lam"):
            self.s.lam.ema(act.index, received)

    def _do_lam_pack(self, act: Compute) -> None:
        with self.s.clock.measure("lam"):
            self.s.lam.record(act.index)    # after the step's own work: what is published is kept
            for msg in act.produces:
                self.s.transport.put(msg, [self.s.lam.pack(msg.dst, act.index)])

    # ---- the stop agreement (engine/schedule.py [Note: stop agreement]) ---------------------
    def _start_round(self, act: StartCollective) -> None:
        flag = torch.tensor([1 if self.stop.requested else 0], dtype=torch.int64)
        work = self.env.comm.start_all_reduce(flag, STOP) if self.env.distributed else None
        self._rounds[act.index] = (flag, work)

    def _wait_round(self, act: WaitCollective) -> None:
        flag, work = self._rounds.pop(act.index)
        if work is not None:
            self.env.comm.wait(work, None, f"agreeing on a stop (round {act.index})")
        spec = self.sched.spec
        agreed_at = act.index + spec.stop_delay      # the same boundary on every rank
        # a host tensor, read without a tensor op (no device is involved, nothing to sync)
        if int(flag.numpy()[0]) == 0 or self.stop.at_step is not None or \
                agreed_at > spec.total_steps:        # rounds waited after the last step
            return
        end = agreed_at + spec.stop_lead
        if end >= spec.total_steps:
            return          # the run ends by then anyway, with its summary
        self.stop.at_step = end
        self.sched = RankSchedule(spec.with_end(end), self.env.rank, self.sched.start,
                                  self.sched.nonfinite_stop)
        before, i = self.events, self._event
        self.events = self._course(end)
        assert self.events[:i] == before[:i] and self.events[i].a == before[i].a, \
            "a stop must not change the course before the run of steps it is agreed in"
        if self.env.rank == 0:
            console.print(f"stop requested ({self.stop.reason or 'by another rank'}): every "
                          f"rank stops when {end} steps are done, with a checkpoint there")

    def _log_preempted(self, step: int) -> None:
        if self.env.rank == 0:
            self._record({"kind": "preempted", "step": step, "epoch": self.epoch,
                          "rank": 0, "reason": self.stop.reason})

    # ---- checkpoints (the schedule's `checkpoint` actions) ----------------------------------
    def save_checkpoint(self) -> None:
        """A checkpoint at the current step, outside the run's course (every rank must call it
        at the same point: it runs the schedule's checkpoint actions, collectives included)."""
        self._run(self.sched.checkpoint(self.step))

    def _do_write_checkpoint(self, act: Compute) -> None:
        self._gathered["checkpoint"] = checkpoint_state.write_module_files(
            self.cfg.run_dir, act.index, self.stage, self.s.lam, self.s.replica)
        self._write_spans()        # a killed run keeps its timeline up to here

    def _do_write_meta(self, act: Compute) -> None:
        s, step = self.s, act.index
        write_meta(self.cfg.run_dir, step, {
            "epoch": step // s.steps_per_epoch, "batch_in_epoch": step % s.steps_per_epoch,
            "K": len(s.all_modules), "world_size": self.env.world,
            "replicas": s.placement.replicas, "preempted": step == self.stop.at_step},
            self._gathered.pop("checksums"))

    # ---- evaluation ------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Streams the test set through the pipeline; every rank scores its own heads. With
        replicas, replica r takes every D-th test batch from batch r on."""
        s, stage = self.s, self.stage
        stage.train(False)
        self._eval_counts = {}     # module -> [top-1, top-5] correct, for modules with a head
        if s.is_first:
            self._batches = s.test_set.batches(self._eval_bs, epoch=0, seed=0, train=False,
                                               every=(s.replica, s.placement.replicas))
        self._run(self.sched.evaluate(self.eval_batches))
        stage.train(True)
        merged = {}
        for part in self._gathered.pop("eval"):
            for k, (top1, top5) in part.items():
                merged[k] = [merged.get(k, [0, 0])[0] + top1, merged.get(k, [0, 0])[1] + top5]
        n, K = s.test_samples, len(s.all_modules)
        # null for a module without a head of its own (the first modules of an MLM plan)
        per_module = [100.0 * (1 - merged[k][0] / n) if k in merged else None for k in range(K)]
        return {"per_module_test_error": per_module, "test_top1_error": per_module[-1],
                "test_top5_error": 100.0 * (1 - merged[K - 1][1] / n)}

    def _do_load_eval(self, act: Compute) -> None:
        with self.s.clock.measure("data"):
            x, y = next(self._batches)
        self._inputs[("eval", act.index)] = (x, y, x if self.cfg.method.name == "infopro"
                                             else None)

    def _do_eval(self, act: Compute) -> None:
        x, y, images = self._input(act, ("eval", act.index))
        out, counts = self.stage.eval_batch(x, y, images)
        for k, (top1, top5) in counts.items():
            got = self._eval_counts.setdefault(k, [0, 0])
            got[0] += top1
            got[1] += top5
        for msg in act.produces:
            self.s.transport.put_forward(msg, out, y, images)

    def _log_eval(self, result: dict, train_s: float) -> None:
        """`train_s`: training seconds of this launch so far, evaluation excluded (what a
        time-to-accuracy comparison reads)."""
        if self.env.rank == 0:
            self._record({"kind": "eval", "step": self.step, "epoch": self.epoch,
                          "rank": 0, "train_s": train_s, **result})
            console.print(f"epoch {self.epoch} step {self.step}: test top-1 error "
                          f"{result['test_top1_error']:.2f}%, top-5 "
                          f"{result['test_top5_error']:.2f}%")

    def _check_finite(self, every_rank: bool = False) -> None:
        """train.nonfinite=stop: ends the run if a module skipped an update because something
        was not finite (updates.py [Note: non-finite on the device]). Read once per logging
        window on this rank; before every checkpoint (`every_rank`, the schedule's "agree on
        non-finite steps"; a run's last step always has one) all ranks agree, and the rank that
        saw the earliest step names module and step."""
        if self.cfg.train.nonfinite != "stop":
            return
        bad = self.stage.first_nonfinite()
        if every_rank:
            found = [(b[1], r, b[0]) for r, b in enumerate(gather_all(self.env, bad)) if b]
            if found and min(found)[1] != self.env.rank:
                raise NonFiniteLoss(f"rank {self.env.rank}: stopping, rank {min(found)[1]} "
                                    f"found a non-finite loss or gradient (see its line)")
        if bad is not None:
            raise NonFiniteLoss(f"rank {self.env.rank}: module {bad[0]} had a non-finite loss "
                                f"or gradient at step {bad[1]} (its update was skipped); "
                                f"lower train.lr, or set train.nonfinite=skip to drop such "
                                f"batches")

    def _banner(self) -> list[str]:
        c, g = self._compile_report(), self._graph_report()
        compiled = (f"{c['compiled_modules']} module(s)" if c.get("compiled_modules")
                    else f"off ({c.get('off') or 'no module'})")
        return banner_lines(self.s, self.ranks, compiled,
                            "on" if self.graphed is not None else f"off ({g['off']})")

    def _graph_report(self) -> dict:
        """How this rank's training steps ran (engine/graphs.py)."""
        g = self.graphed
        if g is None:
            return {"replayed_steps": 0, "eager_steps": None,
                    "off": graph_skip_reason(self.cfg, self.s)}
        return {"replayed_steps": g.replays, "eager_steps": g.eager_steps, "off": g.failed}

    def _compile_report(self) -> dict:
        """Whether this rank's modules ran compiled (engine/compiled.py), or why not."""
        c = self.stage.compiled
        if c is None:
            return {"compiled_modules": 0,
                    "off": compile_skip_reason(self.cfg.train.compile, self.env.device)}
        return c.report()

    @property
    def preempted(self) -> bool:
        return self.stop.at_step is not None and self.step == self.stop.at_step

    def _record(self, record: dict) -> None:
        """A metrics.jsonl line, and the same figures to the trackers (trackers.py)."""
        self.metrics.write(record)
        self.tracker.log(scalars(record), record["step"])

    def _write_spans(self) -> None:
        try:
            self.spans.write(self.cfg.run_dir / "timeline", self.env.rank, self.env.world)
        except OSError:
            # a full disk: the checkpoint's own error (agreed by every rank) or the run's
            # outcome matters more than the timeline, and raising here would skip a collective
            pass

    def close(self) -> None:
        self.metrics.close()
        self.tracker.close()
        self._write_spans()
