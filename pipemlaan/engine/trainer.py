"""The training loop, the same on every rank and in a single process (a world of one rank).

`Trainer(cfg, env)` does the start-up (collective checks, model, partition, links, resume);
`train()` runs epochs of steps, evaluation and checkpoints, and returns the summary on rank 0.
Each replica's first stage reads its slice of every batch; the other stages receive activations
from their left neighbour (with pipeline.replicas=1, rank 0 reads the data).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch

from pipemlaan import checkpoint as ckpt
from pipemlaan.config import Config, method_label, to_toml, validate_world
from pipemlaan.data import dataset_spec, load_datasets, validate_data
from pipemlaan.engine.distributed import DistEnv, agree, barrier, broadcast, gather_all
from pipemlaan.engine.lam import LamSync
from pipemlaan.engine.p2p import EVAL, TRAIN, Links
from pipemlaan.engine.partition import (balanced_partition, check_partition, describe,
                                        measure_costs)
from pipemlaan.engine.replicas import GradSync, Layout, new_groups, sync_batch_norm
from pipemlaan.engine.schedule import lr_at
from pipemlaan.engine.stage import NonFiniteLoss, Stage
from pipemlaan.errors import ConfigError, PipemlaanError
from pipemlaan.local.module import build_local_modules, window_plan
from pipemlaan.metrics import MetricsWriter, SavedTensorTracker, cuda_memory, state_bytes
from pipemlaan.ui import LiveView, NullView, console, results_table


def print0(env: DistEnv, *args) -> None:
    if env.rank == 0:
        console.print(*args)


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.run_dir = cfg.run_dir
        self.spec = dataset_spec(cfg.data)
        self.backbone, self.all_modules = build_local_modules(cfg, self.spec)
        self.plan = window_plan(cfg, len(self.all_modules))
        K = len(self.all_modules)
        self.min_per_rank = max(1, self.plan.max_reach() - 1)

        self._auto_resume_after_restart()
        # Start-up checks run on every rank and are agreed on before anything is written.
        error = None
        try:
            validate_world(cfg, env.world, K)
            if cfg.pipeline.partition and env.world > 1:
                check_partition(cfg.pipeline.partition, self.min_per_rank)
            if env.rank == 0:
                validate_data(cfg.data)
                self._check_run_dir()
        except PipemlaanError as e:
            error = e
        agree(env, error)
        D = cfg.pipeline.replicas
        self.layout = Layout(env.rank, D, env.world // D)
        stage_group, self.replica_group = new_groups(self.layout, env.distributed)

        self.shapes = self._module_output_shapes()
        self.partition = self._partition()
        lo = sum(self.partition[:self.layout.stage])
        hi = lo + self.partition[self.layout.stage]
        owned = self.all_modules[lo:hi]
        for m in self.all_modules:
            if not (lo <= m.index < hi):
                m.to("meta")   # other ranks' modules: keep the bookkeeping, drop the weights
        for m in owned:
            m.to(env.device)
        grad_sync = None
        if D > 1:
            grad_sync = GradSync(stage_group, D, env.rank, cfg.pipeline.timeout_s)
            if cfg.pipeline.sync_bn:
                for m in owned:
                    sync_batch_norm(m, grad_sync)
        self.is_first, self.is_last = lo == 0, hi == K
        self.tracker = SavedTensorTracker()
        pipelined = self.layout.stages > 1
        async_pipe = cfg.pipeline.mode == "async" and pipelined
        self.stage = Stage(cfg, owned, self.plan, env.device, stash=async_pipe,
                           saved_tracker=self.tracker, grad_sync=grad_sync)
        self.in_flight = cfg.pipeline.microbatches if async_pipe else 1
        self.need_images = cfg.method.name == "infopro"
        self.local_batch = cfg.train.batch_size // D

        # Each replica's first stage reads the data; the schedule's lengths come from rank 0.
        self.train_set = self.test_set = None
        if self.is_first:
            self.train_set, self.test_set, _ = load_datasets(cfg.data, env.device)
        lengths = None
        if env.rank == 0:
            lengths = (self.train_set.num_batches(cfg.train.batch_size, True),
                       self.test_set.num_samples)
        self.steps_per_epoch, self.test_samples = broadcast(env, lengths)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} is larger than the "
                              f"training set; lower it")
        full = cfg.train.epochs * self.steps_per_epoch
        self.total_steps = min(full, cfg.train.max_steps) if cfg.train.max_steps else full

        self.links = None
        if pipelined:
            self.links = Links(
                env.rank, self.layout.prev, self.layout.next, env.device,
                in_shape=self.shapes[lo - 1] if lo > 0 else self.spec_shape,
                out_shape=self.shapes[hi - 1], image_shape=self.spec_shape if self.need_images
                else None, batch_size=self.local_batch, grads_in=len(self.stage.from_next),
                grads_out=len(self.stage.to_prev), ring=self.in_flight + 1,
                timeout_s=cfg.pipeline.timeout_s)
            self.links.handshake(self.config_hash())
        self.lam = self._lam_sync(lo, hi)

        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        if cfg.run.resume:
            self._resume()
        if env.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.toml").write_text(to_toml(cfg))
        if env.distributed:
            barrier(self.env)
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl")

    # ---- start-up helpers ----------------------------------------------------------------
    @property
    def spec_shape(self) -> tuple[int, ...]:
        return (self.spec.in_channels, *self.spec.image_size)

    def config_hash(self) -> int:
        return int(hashlib.sha256(to_toml(self.cfg).encode()).hexdigest()[:12], 16)

    def _auto_resume_after_restart(self) -> None:
        """torchrun --max-restarts restarts every worker with the same arguments: continue
        from the last complete checkpoint (or start over if the first one was never written)."""
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
            return
        has = (ckpt.latest_checkpoint(self.run_dir) is not None) if self.env.rank == 0 else None
        has = broadcast(self.env, has)
        self.cfg.run.resume = bool(has)
        self.cfg.run.overwrite = not has
        print0(self.env, f"restart {os.environ['TORCHELASTIC_RESTART_COUNT']}: "
                         + ("resuming from the last checkpoint" if has else "starting over"))

    def _check_run_dir(self) -> None:
        d, run = self.run_dir, self.cfg.run
        if d.exists() and any(d.iterdir()) and not run.resume:
            if not run.overwrite:
                raise ConfigError(f"run directory {d} already exists; pass --run.resume=true "
                                  f"to continue it, --run.overwrite=true to replace it, or a "
                                  f"new --run.name")
            shutil.rmtree(d)
        if run.resume and ckpt.latest_checkpoint(d) is None:
            raise ConfigError(f"--run.resume=true but {d} holds no complete checkpoint; drop "
                              f"--run.resume or check --run.name / --run.dir")
        try:
            d.parent.mkdir(parents=True, exist_ok=True)
            probe = d.parent / f".pipemlaan-write-test-{d.name}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"cannot write to {d.parent} ({e.strerror}); choose a writable "
                              f"--run.dir") from None

    @torch.no_grad()
    def _module_output_shapes(self) -> list[tuple[int, ...]]:
        x = torch.zeros(1, *self.spec_shape)
        shapes = []
        for m in self.all_modules:
            was = m.training
            m.eval()
            x = m.body(x)
            m.train(was)
            shapes.append(tuple(x.shape[1:]))
        return shapes

    def _partition(self) -> list[int]:
        """Modules per stage (the same in every replica)."""
        cfg, env, K = self.cfg, self.env, len(self.all_modules)
        stages = self.layout.stages
        if stages == 1:
            return [K]
        if cfg.pipeline.partition:
            parts = list(cfg.pipeline.partition)
            print0(env, f"partition {parts} (from pipeline.partition)")
            return parts
        costs = None
        if env.rank == 0:
            g = torch.Generator().manual_seed(0)
            n = min(cfg.train.batch_size, 32)
            x = torch.randn(n, *self.spec_shape, generator=g).to(env.device)
            y = torch.randint(0, self.spec.num_classes, (n,), generator=g).to(env.device)
            mods = [m.to(env.device) for m in self.all_modules]
            costs = measure_costs(mods, x, y)
            for m in mods:
                m.to("cpu")
        costs = broadcast(env, costs)
        parts = balanced_partition(costs, stages, self.min_per_rank)
        print0(env, describe(parts, costs))
        return parts

    def _lam_sync(self, lo: int, hi: int) -> LamSync | None:
        if not any(m.twin is not None for m in self.all_modules):
            return None
        # LAM weights travel within a replica: block -> the global rank of its stage here
        owner = {}
        start = 0
        for s, n in enumerate(self.partition):
            for m in self.all_modules[start:start + n]:
                for b in range(m.block_range[0], m.block_range[1] + 1):
                    owner[b] = self.layout.rank_of(self.layout.replica, s)
            start += n
        live = {b: self.backbone.blocks[b] for b, r in owner.items() if r == self.env.rank}
        return LamSync(self.cfg, self.env.rank, self.stage.modules, self.all_modules, owner,
                       live, self.total_steps, group=self.replica_group, device=self.env.device)

    # ---- the loop ------------------------------------------------------------------------
    def train(self) -> dict | None:
        cfg, env = self.cfg, self.env
        t_start = time.perf_counter()
        view = (LiveView(self.run_dir / "metrics.jsonl", env.world, cfg.run_name)
                if env.rank == 0 and cfg.run.progress else NullView())
        if self.lam:
            self.lam.publish(self.step)
            self.lam.start(self.step)
        train_time, images_done = 0.0, 0
        eval_result = None
        view.start(self.total_steps, self.step)
        try:
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                images_done += self._train_epoch(view)
                train_time += time.perf_counter() - t0
                last = self.step >= self.total_steps
                if self.batch_in_epoch == 0:   # a whole epoch ended (not a max_steps stop)
                    due = (self.epoch % cfg.train.eval_every == 0)
                    if due or last:
                        eval_result = self.evaluate()
                        self._log_eval(eval_result, train_time)
                    if self.epoch % cfg.run.checkpoint_every == 0 or last:
                        self.save_checkpoint()
                elif last:
                    eval_result = self.evaluate()
                    self._log_eval(eval_result, train_time)
                    self.save_checkpoint()
            if self.lam:
                self.lam.finish()
            if eval_result is None:   # resumed a finished run: evaluate what it holds
                eval_result = self.evaluate()
        finally:
            view.stop()
        return self._summary(eval_result, train_time, images_done, time.perf_counter() - t_start)

    def _train_epoch(self, view) -> int:
        """Runs steps until the epoch (or the step budget) ends; returns images processed."""
        cfg, stage, links = self.cfg, self.stage, self.links
        bs = cfg.train.batch_size
        batches = None
        if self.is_first:
            batches = self.train_set.batches(bs, epoch=self.epoch, seed=cfg.train.seed,
                                             train=True, start=self.batch_in_epoch,
                                             shard=(self.layout.replica, self.layout.replicas))
        stage.train(True)
        done, window_t0, window_images = 0, time.perf_counter(), 0
        compute = 0.0
        if links:
            links.timer.reset()
        while self.batch_in_epoch < self.steps_per_epoch and self.step < self.total_steps:
            t = self.step
            if self.lam:
                self.lam.before_step(t)
            lr = lr_at(t, self.steps_per_epoch, cfg.train)
            if self.is_first:
                x, y = next(batches)
                images = x if self.need_images else None
            else:
                x, y, images = links.recv_forward(TRAIN, t)
            c0 = time.perf_counter()
            try:
                out, upstream = stage.forward_batch(t, lr, x, y, images)
            except NonFiniteLoss as e:
                raise NonFiniteLoss(f"rank {self.env.rank}: {e}") from None
            compute += time.perf_counter() - c0
            if links:
                links.send_grads(t, upstream)
                if not self.is_last:
                    links.send_forward(TRAIN, t, out, y, images)
                while len(stage.unfinished()) >= self.in_flight:
                    grads = links.recv_grads()
                    c0 = time.perf_counter()
                    stage.receive_grads(stage.unfinished()[0], grads)
                    compute += time.perf_counter() - c0
            if self.lam:
                self.lam.publish(t + 1)
            self.step += 1
            self.batch_in_epoch += 1
            every = cfg.run.checkpoint_steps
            if every and self.step % every == 0 and self.batch_in_epoch < self.steps_per_epoch \
                    and self.step < self.total_steps:
                self._drain()
                self.save_checkpoint()
            done += bs
            window_images += bs
            if self.step % cfg.run.log_every == 0 or self.step == self.total_steps:
                elapsed = time.perf_counter() - window_t0
                record = self._train_record(window_images / elapsed, compute / elapsed, elapsed,
                                            lr)
                self.metrics.write(record)
                view.update(self.step, record if self.env.rank == 0 else {})
                window_t0, window_images, compute = time.perf_counter(), 0, 0.0
                if links:
                    links.timer.reset()
            elif self.env.rank == 0:
                view.update(self.step, {})
        self._drain()
        if self.batch_in_epoch >= self.steps_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0
        return done

    def _drain(self) -> None:
        """Finishes every batch still waiting for window gradients, and every send."""
        if self.links:
            while self.stage.unfinished():
                self.stage.receive_grads(self.stage.unfinished()[0], self.links.recv_grads())
            self.links.reap()

    def _train_record(self, images_per_s: float, compute_frac: float, elapsed: float,
                      lr: float) -> dict:
        timer = self.links.timer if self.links else None
        return {
            "kind": "train", "step": self.step, "epoch": self.epoch, "rank": self.env.rank,
            "replica": self.layout.replica, "stage": self.layout.stage,
            "modules": self.stage.indices, "lr": lr,
            "losses": {str(k): float(v) for k, v in self.stage.losses.items()},
            "images_per_s": images_per_s, "compute_frac": compute_frac,
            "recv_wait_s": timer.recv_wait if timer else 0.0,
            "send_wait_s": timer.send_wait if timer else 0.0,
            "recv_wait_frac": (timer.recv_wait / elapsed) if timer else 0.0,
            "send_wait_frac": (timer.send_wait / elapsed) if timer else 0.0,
            "activation_bytes": self.tracker.peak, **self._memory(),
        }

    def _memory(self) -> dict:
        mods = list(self.stage.modules.values())
        static = state_bytes(mods, self.stage.optimizers.values())
        out = {"peak_memory_bytes": self.tracker.peak + static}
        out.update(cuda_memory(self.env.device))
        if "cuda_max_allocated" in out:
            out["peak_memory_bytes"] = out["cuda_max_allocated"]
        return out

    # ---- evaluation ------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Streams the test set through the pipeline; every rank scores its own heads. With
        replicas, replica r takes every D-th test batch from batch r on."""
        links, stage = self.links, self.stage
        stage.train(False)
        bs = self.local_batch
        n_batches = -(-self.test_samples // bs)
        mine = range(self.layout.replica, n_batches, self.layout.replicas)
        counts = {k: [0, 0] for k in stage.indices}
        batches = (self.test_set.batches(bs, epoch=0, seed=0, train=False,
                                         every=(self.layout.replica, self.layout.replicas))
                   if self.is_first else None)
        for i in mine:
            if self.is_first:
                x, y = next(batches)
                images = x if self.need_images else None
            else:
                x, y, images = links.recv_forward(EVAL, i)
            out, c = stage.eval_batch(x, y, images)
            for k, (top1, top5) in c.items():
                counts[k][0] += top1
                counts[k][1] += top5
            if links and not self.is_last:
                links.send_forward(EVAL, i, out, y, images)
        if links:
            links.reap()
        stage.train(True)
        merged = {}
        for part in gather_all(self.env, counts):
            for k, (top1, top5) in part.items():
                merged[k] = [merged.get(k, [0, 0])[0] + top1, merged.get(k, [0, 0])[1] + top5]
        n = self.test_samples
        K = len(self.all_modules)
        per_module = [100.0 * (1 - merged[k][0] / n) for k in range(K)]
        return {"per_module_test_error": per_module, "test_top1_error": per_module[-1],
                "test_top5_error": 100.0 * (1 - merged[K - 1][1] / n)}

    def _log_eval(self, result: dict, train_s: float) -> None:
        """`train_s`: training seconds of this launch so far, evaluation excluded (what a
        time-to-accuracy comparison reads)."""
        if self.env.rank == 0:
            self.metrics.write({"kind": "eval", "step": self.step, "epoch": self.epoch,
                                "rank": 0, "train_s": train_s, **result})
            console.print(f"epoch {self.epoch} step {self.step}: test top-1 error "
                          f"{result['test_top1_error']:.2f}%, top-5 "
                          f"{result['test_top5_error']:.2f}%")

    # ---- checkpoints ---------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        d = ckpt.step_dir(self.run_dir, self.step)
        sums, error = {}, None
        # replicas hold identical weights: replica 0 writes them (every replica loads them)
        mine = self.stage.modules.items() if self.layout.replica == 0 else []
        try:
            d.mkdir(parents=True, exist_ok=True)
            for k, mod in mine:
                state = {"module": mod.state_dict(),
                         "optimizer": self.stage.optimizers[k].state_dict(),
                         "lam_snapshot": self.lam.state(k) if self.lam else None}
                name = f"module_{k:03d}.pt"
                sums[name] = ckpt.save_module_file(d / name, state)
        except OSError as e:
            error = PipemlaanError(f"cannot write checkpoint {d} ({e.strerror}); free disk "
                                   f"space or choose another --run.dir; earlier checkpoints "
                                   f"are intact")
        agree(self.env, error)
        merged = {}
        for part in gather_all(self.env, sums):
            merged.update(part)
        if self.env.rank == 0:
            ckpt.write_meta(self.run_dir, self.step, {
                "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "K": len(self.all_modules), "world_size": self.env.world,
                "replicas": self.layout.replicas}, merged)
        if self.env.distributed:
            barrier(self.env)

    def _resume(self) -> None:
        found = ckpt.latest_checkpoint(self.run_dir) if self.env.rank == 0 else None
        found = broadcast(self.env, (str(found[0]), found[1]) if found else None)
        if found is None:
            raise ConfigError(f"--run.resume=true but {self.run_dir} holds no complete "
                              f"checkpoint")
        d, meta = Path(found[0]), found[1]
        if meta["K"] != len(self.all_modules):
            raise ConfigError(f"checkpoint {d} has K={meta['K']} modules but model.K gives "
                              f"{len(self.all_modules)}; resume with the same model.K")
        for k, mod in self.stage.modules.items():
            state = ckpt.load_module_file(d / f"module_{k:03d}.pt", self.env.device)
            mod.load_state_dict(state["module"])
            self.stage.optimizers[k].load_state_dict(state["optimizer"])
            if self.lam and state["lam_snapshot"] is not None:
                self.lam.load_state(k, state["lam_snapshot"])
        self.step, self.epoch = meta["step"], meta["epoch"]
        self.batch_in_epoch = meta["batch_in_epoch"]
        print0(self.env, f"resumed from {d} at step {self.step} (epoch {self.epoch})")

    # ---- summary -------------------------------------------------------------------------
    def _summary(self, result: dict, train_time: float, images: int, wall: float) -> dict | None:
        mods = self.stage.modules
        backbone_sum = 0.0
        for m in mods.values():
            for p in m.body.parameters():
                backbone_sum += p.detach().double().sum().item()
            if m.index == len(self.all_modules) - 1:
                for p in m.h.parameters():
                    backbone_sum += p.detach().double().sum().item()
        mine = {"losses": {k: float(v) for k, v in self.stage.losses.items()},
                "param_sum": backbone_sum,
                "train_time": train_time, "activation_bytes": self.tracker.peak,
                **self._memory()}
        parts = gather_all(self.env, mine)
        if self.env.rank != 0:
            return None
        losses = {}     # each replica's loss is over its slice: the global batch's is the mean
        for p in parts:
            for k, v in p["losses"].items():
                losses[k] = losses.get(k, 0.0) + v / self.layout.replicas
        slowest = max(p["train_time"] for p in parts)
        summary = {
            "method": method_label(self.cfg.method), "model": self.cfg.model.name,
            "dataset": self.cfg.data.name, "K": len(self.all_modules),
            "world_size": self.env.world, "replicas": self.layout.replicas,
            "stages": self.layout.stages, "partition": self.partition,
            "mode": self.cfg.pipeline.mode, "epochs": self.epoch, "steps": self.step,
            **result,
            "images_per_s": images / slowest if slowest > 0 else 0.0,
            "wall_s": wall,
            "peak_memory_bytes": [p["peak_memory_bytes"] for p in parts],
            "activation_bytes": [p["activation_bytes"] for p in parts],
            "final_train_loss_per_module": [losses.get(k) for k in range(len(self.all_modules))],
            "param_checksum": sum(p["param_sum"] for p in parts[:self.layout.stages]),
            # replicas of a stage must agree: a difference means they drifted apart
            "param_checksum_per_rank": [p["param_sum"] for p in parts],
            "device": str(self.env.device),
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        console.print(results_table(summary))
        return summary

    def close(self) -> None:
        self.metrics.close()
