"""The training loop, the same on every rank and in a single process (a world of one rank).

`Trainer(cfg, env)` builds the rank (engine/setup.py) and resumes it if asked; `train()` follows
the run's course from engine/schedule.py (runs of steps, evaluations, checkpoints) and, inside
each, executes this rank's action lists: posts and waits go to the transport (engine/p2p.py),
compute actions to the stage (engine/stage.py) and the LAM snapshots (engine/lam.py). The order
of everything that crosses ranks comes from the schedule alone. Returns the summary on rank 0.
"""

from __future__ import annotations

import json
import time

import torch

from pipemlaan import checkpoint as ckpt
from pipemlaan.config import Config, to_toml
from pipemlaan.engine.distributed import DistEnv, barrier, gather_all
from pipemlaan.engine.graphs import GraphedStep, graph_skip_reason
from pipemlaan.engine.lr_schedule import lr_at
from pipemlaan.engine.schedule import Compute, Post, Wait, run_events
from pipemlaan.engine.setup import build
from pipemlaan.engine.stage import NonFiniteLoss
from pipemlaan.metrics import MetricsWriter, StepTracer, summary, train_record
from pipemlaan.ui import LiveView, NullView, console, results_table


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.s = build(cfg, env)
        self.stage = self.s.stage
        self.step = 0
        if cfg.run.resume:
            self.step = ckpt.resume(self.s)[0]
        self.s.schedule.start = self.step
        if env.rank == 0:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            (cfg.run_dir / "config.toml").write_text(to_toml(cfg))
        barrier(env)
        self.metrics = MetricsWriter(cfg.run_dir / "metrics.jsonl")
        self._inputs: dict = {}        # batches the first stage loaded, by step / eval index
        self._batches = None
        self._lr = 0.0
        self._tracer = StepTracer(cfg.run.profile_steps, cfg.run_dir / "traces", env)
        # after resume: a captured graph must see the weights and optimizer state it updates
        self.graphed = (GraphedStep(self.stage) if graph_skip_reason(cfg, self.s) is None
                        else None)
        self._forward = self.graphed or self.stage.forward_batch

    @property
    def epoch(self) -> int:
        return self.step // self.s.steps_per_epoch

    # ---- the run's course ------------------------------------------------------------------
    def train(self) -> dict | None:
        cfg, s = self.cfg, self.s
        t_start = time.perf_counter()
        view = (LiveView(cfg.run_dir / "metrics.jsonl", self.env.world, cfg.run_name)
                if self.env.rank == 0 and cfg.run.progress else NullView())
        events = run_events(steps_per_epoch=s.steps_per_epoch, total_steps=s.total_steps,
                            start=self.step, eval_every=cfg.train.eval_every,
                            checkpoint_every=cfg.run.checkpoint_every,
                            checkpoint_steps=cfg.run.checkpoint_steps)
        train_time, images, result = 0.0, 0, None
        view.start(s.total_steps, self.step)
        try:
            self._run(s.schedule.lam_start())
            if s.lam:
                s.lam.record(self.step)
            for ev in events:
                if ev.kind == "train":
                    t0 = time.perf_counter()
                    images += self._train_run(ev.a, ev.b, view)
                    train_time += time.perf_counter() - t0
                elif ev.kind == "eval":
                    result = self.evaluate()
                    self._log_eval(result, train_time)
                elif ev.kind == "checkpoint":
                    self.save_checkpoint()
                elif ev.kind == "lam_finish":
                    self._tracer.at(None)
                    self._run(s.schedule.lam_finish(ev.a))
        finally:
            view.stop()
        out = summary(s, result, train_time, images, time.perf_counter() - t_start,
                      self.step, self.epoch)
        if out is not None:
            out["cuda_graph"] = self._graph_report()
            (cfg.run_dir / "summary.json").write_text(json.dumps(out, indent=1))
            console.print(results_table(out))
        return out

    def _train_run(self, a: int, b: int, view) -> int:
        """Steps [a, b) and their drain; returns the images processed."""
        cfg, s = self.cfg, self.s
        if s.is_first:
            self._batches = s.train_set.batches(
                cfg.train.batch_size, epoch=a // s.steps_per_epoch, seed=cfg.train.seed,
                train=True, start=a % s.steps_per_epoch,
                shard=(s.layout.replica, s.layout.replicas))
        self.stage.train(True)
        window_t0, window_images = time.perf_counter(), 0
        s.clock.reset()
        for t in range(a, b):
            self._tracer.at(t)
            self._run(s.schedule.step(t, a, b))
            if s.lam:
                s.lam.record(t + 1)      # emulated async pipelines only (engine/lam.py)
            if t == b - 1:
                self._run(s.schedule.drain(a, b))
                self.stage.flush_delayed()
            self.step = t + 1
            window_images += cfg.train.batch_size
            if self.step % cfg.run.log_every == 0 or self.step == s.total_steps:
                self._check_finite()
                elapsed = time.perf_counter() - window_t0
                record = train_record(s, s.clock, self.step, t // s.steps_per_epoch, self._lr,
                                      window_images / elapsed, elapsed)
                self.metrics.write(record)
                view.update(self.step, record if self.env.rank == 0 else {})
                window_t0, window_images = time.perf_counter(), 0
                s.clock.reset()
            elif self.env.rank == 0:
                view.update(self.step, {})
        return (b - a) * cfg.train.batch_size

    # ---- executing actions -------------------------------------------------------------------
    def _run(self, actions) -> None:
        tr = self.s.transport
        for act in actions:
            if isinstance(act, Post):
                tr.post(act.ops)
            elif isinstance(act, Wait):
                tr.wait(act.op)
            elif isinstance(act, Compute):
                getattr(self, "_do_" + act.name)(act)
            else:
                self._eval_parts = gather_all(self.env, self._eval_counts)

    def _input(self, act: Compute, key) -> tuple:
        """(x, labels, images): received from the previous rank, or what `load` put here."""
        got = (self.s.transport.take(act.consumes[0]) if act.consumes
               else self._inputs.pop(key))
        return (*got, None)[:3]

    def _do_load(self, act: Compute) -> None:
        x, y = next(self._batches)
        self._inputs[act.index] = (x, y, x if self.cfg.method.name == "infopro" else None)

    def _do_forward(self, act: Compute) -> None:
        x, y, images = self._input(act, act.index)
        self._lr = lr_at(act.index, self.s.steps_per_epoch, self.cfg.train)
        with self.s.clock.measure("compute"):
            out, upstream = self._forward(act.index, self._lr, x, y, images)
        for msg in act.produces:
            if msg.dst > self.env.rank:
                self.s.transport.put_forward(msg, out, y, images)
            else:
                self.s.transport.put(msg, [self._stack(upstream)])

    def _stack(self, grads):
        return torch.stack(grads).to(self.s.transport.act_dtype)

    def _do_backward(self, act: Compute) -> None:
        (grads,) = self.s.transport.take(act.consumes[0])
        assert self.stage.unfinished()[0] == act.index, "window gradients out of order"
        with self.s.clock.measure("compute"):
            self.stage.receive_grads(act.index, list(grads.unbind(0)))

    def _do_lam_ema(self, act: Compute) -> None:
        received = {m.src: self.s.transport.take(m)[0] for m in act.consumes}
        self.s.lam.ema(act.index, received)

    def _do_lam_pack(self, act: Compute) -> None:
        for msg in act.produces:
            self.s.transport.put(msg, [self.s.lam.pack(msg.dst)])

    # ---- evaluation ------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Streams the test set through the pipeline; every rank scores its own heads. With
        replicas, replica r takes every D-th test batch from batch r on."""
        s, stage = self.s, self.stage
        stage.train(False)
        bs = self.cfg.train.batch_size // s.layout.replicas
        n_batches = -(-s.test_samples // bs)
        self._eval_counts = {}     # module -> [top-1, top-5] correct, for modules with a head
        if s.is_first:
            self._batches = s.test_set.batches(bs, epoch=0, seed=0, train=False,
                                               every=(s.layout.replica, s.layout.replicas))
        self._run(s.schedule.evaluate(n_batches))
        stage.train(True)
        merged = {}
        for part in self._eval_parts:
            for k, (top1, top5) in part.items():
                merged[k] = [merged.get(k, [0, 0])[0] + top1, merged.get(k, [0, 0])[1] + top5]
        n, K = s.test_samples, len(s.all_modules)
        # null for a module without a head of its own (the first modules of an MLM plan)
        per_module = [100.0 * (1 - merged[k][0] / n) if k in merged else None for k in range(K)]
        return {"per_module_test_error": per_module, "test_top1_error": per_module[-1],
                "test_top5_error": 100.0 * (1 - merged[K - 1][1] / n)}

    def _do_load_eval(self, act: Compute) -> None:
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
            self.metrics.write({"kind": "eval", "step": self.step, "epoch": self.epoch,
                                "rank": 0, "train_s": train_s, **result})
            console.print(f"epoch {self.epoch} step {self.step}: test top-1 error "
                          f"{result['test_top1_error']:.2f}%, top-5 "
                          f"{result['test_top5_error']:.2f}%")

    def _check_finite(self, every_rank: bool = False) -> None:
        """train.nonfinite=stop: ends the run if a module skipped an update because something
        was not finite (stage.py [Note: non-finite on the device]). Read once per logging
        window on this rank; before every checkpoint (`every_rank`; a run's last step always
        has one) all ranks agree, and the rank that saw the earliest step names module and
        step."""
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

    def _graph_report(self) -> dict:
        """How this rank's training steps ran (engine/graphs.py)."""
        g = self.graphed
        if g is None:
            return {"replayed_steps": 0, "eager_steps": None,
                    "off": graph_skip_reason(self.cfg, self.s)}
        return {"replayed_steps": g.replays, "eager_steps": g.eager_steps, "off": g.failed}

    def save_checkpoint(self) -> None:
        self._check_finite(every_rank=True)
        spe = self.s.steps_per_epoch
        ckpt.save(self.s, self.step, self.step // spe, self.step % spe)

    def close(self) -> None:
        self.metrics.close()
