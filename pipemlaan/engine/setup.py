"""A rank's start-up: checks, model, partition, process groups, stage, transport, LAM, data.

`build(cfg, env)` returns one `Setup` that the trainer runs. Start-up checks run on every rank
and are agreed on (engine/distributed.py `agree`) before anything is written, so a bad config
stops every rank with the same one-line error.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipemlaan import checkpoint_files as ckpt
from pipemlaan.config import Config, to_toml, validate_world
from pipemlaan.data import dataset_spec, load_datasets, validate_data
from pipemlaan.engine.distributed import DistEnv, agree, broadcast, check_shared_folder
from pipemlaan.engine.lam import LamSync
from pipemlaan.engine.p2p import Transport, StepClock
from pipemlaan.engine.costs import predicted_seconds
from pipemlaan.engine.partition import (balanced_partition, check_partition, describe,
                                        feasible, window_spans)
from pipemlaan.engine.placement import Placement
from pipemlaan.engine.replicas import GradSync, sync_batch_norm
from pipemlaan.engine import checkpoint_state
from pipemlaan.engine.schedule import (PipeSpec, RankSchedule, pipe_group, pipe_spec,
                                       process_groups, stage_group)
from pipemlaan.engine.stage import Stage
from pipemlaan.errors import ConfigError, PipemlaanError
from pipemlaan.local.module import build_local_modules, output_shapes, window_plan
from pipemlaan.models import num_blocks
from pipemlaan.metrics import SavedTensorTracker
from pipemlaan.ui import console


@dataclass
class Setup:
    cfg: Config
    env: DistEnv
    placement: Placement
    replica: int                  # this rank's seat in the replicas x stages grid
    stage_index: int
    all_modules: list
    stage: Stage
    tracker: SavedTensorTracker
    transport: Transport | None
    lam: LamSync | None
    spec: PipeSpec
    schedule: RankSchedule
    resumed: dict | None          # the checkpoint's meta.json when the run resumed
    train_set: object
    test_set: object
    steps_per_epoch: int
    test_samples: int
    total_steps: int
    clock: StepClock
    module_costs: list[float]     # predicted seconds per training step, per module (costs.py)
    # CUDA: start-up's allocator peak, reported apart (set when the trainer's start-up ends)
    startup_memory: dict = field(default_factory=dict)

    @property
    def predicted_stage_s(self) -> float:
        """This rank's predicted seconds of compute per training step (engine/costs.py)."""
        return sum(self.module_costs[k] for k in self.stage.indices)

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.placement.stages - 1


def print0(env: DistEnv, *args) -> None:
    if env.rank == 0:
        console.print(*args)


def build(cfg: Config, env: DistEnv) -> Setup:
    spec = dataset_spec(cfg.data)
    backbone, all_modules = build_local_modules(cfg, spec)
    plan = window_plan(cfg, len(all_modules))
    K = len(all_modules)
    spans = window_spans(plan)
    resume, overwrite = _resume_after_restart(cfg, env)
    error = None
    try:
        validate_world(cfg, env.world, K)
        if cfg.pipeline.partition and env.world > 1:
            check_partition(cfg.pipeline.partition, spans)
        _check_stages_fit(cfg, env.world // cfg.pipeline.replicas, K, spans)
        if env.rank == 0:
            validate_data(cfg.data)
            _check_run_dir(cfg, resume, overwrite)
    except PipemlaanError as e:
        error = e
    agree(env, error)
    check_shared_folder(env, Path(cfg.run.dir))
    D = cfg.pipeline.replicas
    image_shape = (spec.in_channels, *spec.image_size)
    shapes = output_shapes(all_modules, image_shape)
    partition, module_costs = _partition(cfg, env, env.world // D, all_modules, image_shape,
                                         spans)
    placement = Placement.of(partition, D, all_modules, cfg.method.ema_only_last)
    replica, my_stage = placement.seat(env.rank)
    mine = placement.modules_of(my_stage)
    lo, hi = mine.start, mine.stop
    owned = all_modules[lo:hi]
    for m in all_modules:
        if m.index not in mine:
            m.to("meta")   # other ranks' modules: keep the bookkeeping, drop the weights
    for m in owned:
        m.to(env.device)

    # the schedule needs the run's length: rank 0 reads the data set's, every rank agrees
    train_set = test_set = None
    if lo == 0:
        train_set, test_set, _ = load_datasets(cfg.data, env.device)
    lengths = None
    if env.rank == 0:
        lengths = (train_set.num_batches(cfg.train.batch_size, True), test_set.num_samples)
    steps_per_epoch, test_samples = broadcast(env, lengths)
    if steps_per_epoch == 0:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is larger than the "
                          f"training set; lower it")
    full = cfg.train.epochs * steps_per_epoch
    total = min(full, cfg.train.max_steps) if cfg.train.max_steps else full

    pipelined = placement.stages > 1
    async_pipe = cfg.pipeline.mode == "async" and pipelined
    pspec = pipe_spec(plan, placement, lockstep=not async_pipe,
                      in_flight=cfg.pipeline.in_flight, lam_every=cfg.pipeline.lam_sync_every,
                      total_steps=total)
    if env.distributed:
        env.comm.create_groups(process_groups(pspec))
    grad_sync, clock = None, StepClock(env.device)
    if D > 1:
        grad_sync = GradSync(env.comm, stage_group(my_stage), D, clock)
        if cfg.pipeline.sync_bn:
            for m in owned:
                sync_batch_norm(m, grad_sync)
    # CPU: every step; CUDA: the first steps only (hooks cost GPU time), enough for an async
    # rank's stash to fill, and over before a single process's CUDA graph capture (graphs.py)
    tracker = SavedTensorTracker(steps=None if env.device.type == "cpu" else
                                 2 if placement.stages == 1 else pspec.in_flight + 2)
    emulate = _emulated(cfg, placement.stages, spans, K)
    stage = Stage(cfg, owned, plan, env.device, stash=async_pipe, saved_tracker=tracker,
                  grad_sync=grad_sync, emulate=emulate)
    lam = _lam_sync(cfg, env, placement, backbone, all_modules, stage, total, pspec, emulate)
    # resuming is start-up too: the schedule is built knowing the step it starts from
    start, resumed = 0, None
    if resume:
        found = ckpt.latest_checkpoint(cfg.run_dir) if env.rank == 0 else None
        found = broadcast(env, (str(found[0]), found[1]) if found else None)
        if found is None:
            raise ConfigError(f"--run.resume=true but {cfg.run_dir} holds no complete "
                              f"checkpoint")
        d, resumed = found
        checkpoint_state.load(Path(d), resumed, stage, lam, K, env.device)
        start = resumed["step"]
        print0(env, f"resumed from {d} at step {start} (epoch {resumed['epoch']})")
    schedule = RankSchedule(pspec, env.rank, start, cfg.train.nonfinite == "stop")

    transport = None
    if pipelined:
        bf16 = env.device.type == "cuda" and cfg.train.bf16
        local_batch = cfg.train.batch_size // D
        transport = Transport(
            env.comm, env.rank, env.device, in_shape=shapes[lo - 1] if lo > 0 else image_shape,
            out_shape=shapes[hi - 1], image_shape=image_shape if cfg.method.name == "infopro"
            else None, batch_size=local_batch, grads_in=schedule.grads_in,
            in_flight=pspec.in_flight, act_dtype=torch.bfloat16 if bf16 else torch.float32,
            has_prev=schedule.prev is not None, has_next=schedule.next is not None,
            eval_batch_size=lambda i: min(local_batch, test_samples - i * local_batch),
            clock=clock, lam_buffer=lam.buffer if lam else None)
        transport.handshake(
            config_hash(cfg), schedule.prev, schedule.next,
            pipe_group(env.rank, schedule.prev) if schedule.prev is not None else None,
            pipe_group(env.rank, schedule.next) if schedule.next is not None else None)
    return Setup(cfg, env, placement, replica, my_stage, all_modules, stage,
                 tracker, transport, lam, pspec, schedule, resumed, train_set, test_set,
                 steps_per_epoch, test_samples, total, clock, module_costs)


def config_hash(cfg: Config) -> int:
    return int(hashlib.sha256(to_toml(cfg).encode()).hexdigest()[:12], 16)


def _resume_after_restart(cfg: Config, env: DistEnv) -> tuple[bool, bool]:
    """(resume, overwrite): the config's, except that torchrun --max-restarts restarts every
    worker with the same arguments, which then continue from the last complete checkpoint
    (or start over if the first one was never written)."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        return cfg.run.resume, cfg.run.overwrite
    has = (ckpt.latest_checkpoint(cfg.run_dir) is not None) if env.rank == 0 else None
    has = bool(broadcast(env, has))
    print0(env, f"restart {os.environ['TORCHELASTIC_RESTART_COUNT']}: "
                + ("resuming from the last checkpoint" if has else "starting over"))
    return has, not has


def _check_run_dir(cfg: Config, resume: bool, overwrite: bool) -> None:
    d = cfg.run_dir
    if d.exists() and any(d.iterdir()) and not resume:
        if not overwrite:
            raise ConfigError(f"run directory {d} already exists; pass --run.resume=true "
                              f"to continue it, --run.overwrite=true to replace it, or a "
                              f"new --run.name")
        shutil.rmtree(d)
    if resume and ckpt.latest_checkpoint(d) is None:
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


def _check_stages_fit(cfg: Config, stages: int, K: int, spans: list) -> None:
    """No partition of K modules into `stages` keeps every window across at most one rank
    boundary: say so, with the nearest choices that work."""
    if stages <= 1 or cfg.pipeline.partition or feasible(K, stages, spans):
        return
    widest = max((j - a + 1 for a, j in spans), default=1)
    most = max(r for r in range(1, stages) if feasible(K, r, spans))
    blocks = num_blocks(cfg.model.name)
    fewest = next((k for k in range(K + 1, blocks + 2)
                   if feasible(k, stages, window_spans(window_plan(cfg, k)))), None)
    more_k = (f"model.K={fewest} or more on {stages} stages" if fewest else
              f"a deeper model (no model.K of {cfg.model.name} fits {stages} stages)")
    raise ConfigError(
        f"{stages} pipeline stages cannot hold model.K={K} local modules so that every "
        f"cascade window (the widest covers {widest} modules) crosses at most one rank "
        f"boundary; nearest choices: at most {most} stage(s) for this K and "
        f"method.window={cfg.method.window}, or {more_k}, or a smaller method.window, or "
        f"method.first_modules_head=true")


def _partition(cfg, env, stages, modules, image_shape, spans) -> tuple[list[int], list[float]]:
    """Modules per stage (the same in every replica) and each module's predicted seconds per
    training step, counted on every rank from the modules' shapes at the run's batch
    ([Note: counted costs] in engine/costs.py: the same command always splits the same way)."""
    K = len(modules)
    batch = cfg.train.batch_size // cfg.pipeline.replicas
    costs = predicted_seconds(modules, image_shape, batch, env.device.type)
    if stages == 1:
        return [K], costs
    if cfg.pipeline.partition:
        parts = list(cfg.pipeline.partition)
        print0(env, f"partition {parts} (from pipeline.partition)")
        return parts, costs
    parts = balanced_partition(costs, stages, spans)
    print0(env, describe(parts, costs))
    return parts, costs


def _emulated(cfg: Config, stages: int, spans: list, K: int
              ) -> tuple[list[int], int] | None:
    """pipeline.emulate_async: (module counts per emulated rank, batches in flight), checked
    like a real async pipeline's partition; None when off."""
    counts = cfg.pipeline.emulate_async
    if not counts:
        return None
    if stages > 1:
        raise ConfigError("pipeline.emulate_async makes one process behave as an async "
                          "pipeline; launch it on one rank (or pipeline.replicas = ranks), or "
                          "leave it [] in a pipeline")
    if sum(counts) != K:
        raise ConfigError(f"pipeline.emulate_async={counts} sums to {sum(counts)} but there "
                          f"are {K} local modules; make the counts add up to model.K")
    check_partition(counts, spans, "pipeline.emulate_async")
    return list(counts), cfg.pipeline.in_flight


def _lam_sync(cfg, env, placement, backbone, all_modules, stage, total, spec, emulate=None):
    if not placement.twins:
        return None
    replica, my_stage = placement.seat(env.rank)
    # steps of history an owner keeps: its slowest receiver's lag (lam.py [Note: LAM history])
    keep = max([0, *(spec.lam_lag(o, q) for o, q in spec.lam_flows if o == my_stage)])
    lags = None
    if emulate is not None and cfg.pipeline.emulate_delay != "window":
        # the async pipeline's lag: (owner - receiver stage) x M
        counts, M = emulate
        emulated = Placement.of(counts, 1, all_modules)
        lags = {k: emulated.stage_lag(k) * M for k, _ in emulated.twins}
    live = {b: backbone.blocks[b] for k in placement.modules_of(my_stage)
            for b in range(all_modules[k].block_range[0], all_modules[k].block_range[1] + 1)}
    return LamSync(cfg, env.rank, stage.modules, placement, live, total, device=env.device,
                   lags=lags, keep=keep)
