"""Baseline: end-to-end backprop, data-parallel with torch's DistributedDataParallel, from the
same config, data, backbone, optimizer and learning-rate schedule as `pipemlaan.train`.

  OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc_per_node=N -m benchmarks.ddp_bp \
      --config configs/fmnist_bp_cpu.toml [--section.key=value ...]

(`python -m benchmarks.ddp_bp ...` alone runs one process, no DDP.) It takes pipemlaan's own
config keys, so a comparison changes nothing but the parallelism: the BP network
(method.name=bp is forced), the global `train.batch_size` split over the ranks (rank r trains
the r-th slice of every batch, exactly the samples a pipemlaan replica r would), the SGD and
its parameter groups (local/module.py make_optimizer), the warm-up + cosine schedule, and on
CUDA the same defaults (bf16 autocast, channels-last). DDP averages gradients in buckets that
are all-reduced while the backward pass is still running (gloo on CPU, NCCL on GPUs, one GPU
per rank); each rank normalises with its own slice's batch statistics, as DDP does. CUDA
graphs are not used (DDP's all-reduces during backward would have to be captured too), nor
torch.compile: the run folder's summary says so.

It writes what a pipemlaan run writes, so the benchmarks read both the same way:
`run.dir/run.name/metrics.jsonl` (a train line per rank every `run.log_every` steps with
images/s and the compute / data-wait split; an eval line with the training seconds so far and
the test error after every evaluation: every `train.eval_every` epochs and
`train.eval_every_steps` steps, as pipemlaan evaluates) and `summary.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pipemlaan.config import load_config, to_toml
from pipemlaan.data import dataset_spec, load_datasets
from pipemlaan.engine.lr_schedule import lr_at
from pipemlaan.errors import PipemlaanError
from pipemlaan.local.module import build_local_modules, make_optimizer
from pipemlaan.metrics import (MetricsWriter, SavedTensorTracker, cuda_memory, reset_peaks,
                               state_bytes)


class BPNet(torch.nn.Module):
    """The BP network as pipemlaan builds it: one local module, body + classifier head."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x, labels):
        return self.module.h(self.module.body(x), labels)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.ddp_bp", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None)
    args, overrides = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    try:
        cfg = load_config(args.config, [*overrides, "--method.name=bp", "--method.mlm=false",
                                        "--method.lam=false", "--model.K=1"])
        if cfg.train.batch_size % world:
            raise PipemlaanError(f"train.batch_size={cfg.train.batch_size} does not split "
                                 f"over {world} ranks; use a multiple of {world}")
    except PipemlaanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cuda = cfg.train.device != "cpu" and torch.cuda.is_available()
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    torch.manual_seed(cfg.train.seed)
    spec = dataset_spec(cfg.data)
    _, (module,) = build_local_modules(cfg, spec)
    channels_last = cuda and cfg.train.channels_last
    module.to(device, memory_format=torch.channels_last if channels_last else
              torch.preserve_format)
    net = BPNet(module)
    model = DistributedDataParallel(net, device_ids=[local] if cuda else None) \
        if world > 1 else net
    opt = make_optimizer(module, cfg)
    train_set, test_set, _ = load_datasets(cfg.data, device)
    steps_per_epoch = train_set.num_batches(cfg.train.batch_size, True)
    total = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)
    run_dir = cfg.run_dir
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=cfg.run.overwrite)
        (run_dir / "config.toml").write_text(to_toml(cfg))
    if world > 1:
        dist.barrier()
    metrics = MetricsWriter(run_dir / "metrics.jsonl")
    bf16 = cuda and cfg.train.bf16
    startup = reset_peaks(device)
    # what pipemlaan counts on CPU: bytes saved for backward + parameters, gradients, state
    tracker = SavedTensorTracker(steps=None if device.type == "cpu" else 2)
    local_batch = cfg.train.batch_size // world

    def evaluate(step: int, train_s: float) -> float:
        model.eval()
        right = right5 = 0
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=bf16):
            for x, y in test_set.batches(local_batch, epoch=0, seed=0, train=False,
                                         every=(rank, world)):
                logits = net(x.to(device), y.to(device))[1].float()
                top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
                right += int((top5[:, 0] == y.to(device)).sum())
                right5 += int((top5 == y.to(device)[:, None]).any(1).sum())
        model.train()
        counts = torch.tensor([right, right5], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(counts)
        n = test_set.num_samples
        err = 100.0 * (1 - counts[0].item() / n)
        if rank == 0:
            metrics.write({"kind": "eval", "step": step, "epoch": step // steps_per_epoch,
                           "rank": 0, "train_s": train_s, "test_top1_error": err,
                           "test_top5_error": 100.0 * (1 - counts[1].item() / n),
                           "per_module_test_error": [err]})
            print(f"step {step}: test top-1 error {err:.2f}%", flush=True)
        return err

    step, train_s, err, batches = 0, 0.0, None, None
    t_wall = t_run = window_t0 = time.perf_counter()
    window_images, compute_s, data_s = 0, 0.0, 0.0
    every = [cfg.train.eval_every * steps_per_epoch, cfg.train.eval_every_steps or total]
    while step < total:
        epoch = step // steps_per_epoch
        if step % steps_per_epoch == 0 or batches is None:
            batches = train_set.batches(cfg.train.batch_size, epoch=epoch, seed=cfg.train.seed,
                                        train=True, start=step % steps_per_epoch,
                                        shard=(rank, world))
        t0 = time.perf_counter()
        x, y = next(batches)
        t1 = time.perf_counter()
        x = x.to(device, non_blocking=True,
                 memory_format=torch.channels_last if channels_last else torch.preserve_format)
        y = y.to(device, non_blocking=True)
        lr = lr_at(step, steps_per_epoch, cfg.train)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        with torch.autocast("cuda", torch.bfloat16, enabled=bf16), tracker.track():
            loss, _ = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()          # DDP all-reduces gradient buckets as they become ready
        opt.step()
        if cuda:
            torch.cuda.synchronize(device)
        data_s += t1 - t0
        compute_s += time.perf_counter() - t1
        step += 1
        window_images += cfg.train.batch_size
        if step % cfg.run.log_every == 0 or step == total:
            elapsed = time.perf_counter() - window_t0
            metrics.write({"kind": "train", "step": step, "epoch": epoch, "rank": rank,
                           "replica": rank, "stage": 0, "modules": [0], "lr": lr,
                           "losses": {"0": loss.item()}, "images_per_s": window_images / elapsed,
                           "compute_frac": compute_s / elapsed, "data_wait_frac": data_s / elapsed,
                           "recv_wait_frac": 0.0, "send_wait_frac": 0.0})
            window_t0, window_images, compute_s, data_s = time.perf_counter(), 0, 0.0, 0.0
        if step == total or any(step % e == 0 for e in every):
            train_s += time.perf_counter() - t_run     # evaluation is not training time
            err = evaluate(step, train_s)
            t_run = window_t0 = time.perf_counter()
    images = step * cfg.train.batch_size
    mem = cuda_memory(device)
    peak = mem.get("cuda_max_allocated", tracker.peak + state_bytes([module], [opt]))
    peaks = [None] * world
    if world > 1:
        dist.all_gather_object(peaks, peak)
    else:
        peaks = [peak]
    if rank == 0:
        summary = {"method": "bp ddp", "model": cfg.model.name, "dataset": cfg.data.name,
                   "K": 1, "world_size": world, "replicas": world, "stages": 1,
                   "partition": [1], "epochs": step // steps_per_epoch, "steps": step,
                   "test_top1_error": err, "images_per_s": images / train_s if train_s else 0,
                   "wall_s": time.perf_counter() - t_wall, "peak_memory_bytes": peaks,
                   "startup_memory": startup, "device": str(device),
                   "param_checksum": sum(p.detach().double().sum().item()
                                         for p in module.parameters()),
                   "cuda_graph": {"replayed_steps": 0, "off": "DDP runs eagerly"},
                   "compile": {"compiled_modules": 0, "off": "DDP baseline runs eagerly"},
                   "precision": "bf16 autocast" if bf16 else "fp32",
                   "channels_last": channels_last}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    metrics.close()
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
