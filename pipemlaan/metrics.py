"""Measurements: memory per rank, step timings, the metrics.jsonl writer, and the records a
run writes (a training window's line, summary.json).

Memory on CPU is device-independent and comparable across methods: the peak bytes of tensors
that autograd saved for backward (counted through saved-tensor hooks, each storage once, while
it is alive) plus the bytes of parameters, gradients and optimizer state. On CUDA the
allocator's peak (torch.cuda.max_memory_allocated) and NVML's used memory are reported too.
"""

from __future__ import annotations

import json
import os
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch


class SavedTensorTracker:
    """Peak bytes of live tensors saved for backward, each storage counted once. Disabled (peak
    0, no hooks) on CUDA, where the allocator's peak is the figure and a Python hook on every
    saved tensor would cost the GPU time."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.live = 0
        self.peak = 0
        self._refs: dict[int, int] = {}   # storage pointer -> number of live saved tensors

    def _pack(self, t: torch.Tensor):
        # A detached alias: the graph holding the tensor itself would make a reference cycle
        # (node -> saved output -> grad_fn -> node) that only a backward pass breaks.
        t = t.detach()
        try:
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):
            return t
        if key not in self._refs:
            self._refs[key] = 0
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self._refs[key] += 1
        weakref.finalize(t, self._release, key, nbytes)
        return t

    def _release(self, key: int, nbytes: int) -> None:
        n = self._refs.get(key, 0) - 1
        if n <= 0:
            self._refs.pop(key, None)
            self.live -= nbytes
        else:
            self._refs[key] = n

    @contextmanager
    def track(self):
        if not self.enabled:
            yield
            return
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield


def state_bytes(modules, optimizers) -> int:
    """Parameters + their gradients (every trainable one holds a gradient at some point of a
    step) + buffers + optimizer state of the given modules."""
    total = 0
    for m in modules:
        for p in m.parameters():
            total += p.numel() * p.element_size() * (2 if p.requires_grad else 1)
        for b in m.buffers():
            total += b.numel() * b.element_size()
    for opt in optimizers:
        for st in opt.state.values():
            for v in st.values():
                if torch.is_tensor(v):
                    total += v.numel() * v.element_size()
    return total


def cuda_memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    out = {"cuda_max_allocated": torch.cuda.max_memory_allocated(device),
           "cuda_max_reserved": torch.cuda.max_memory_reserved(device)}
    try:
        import pynvml
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        out["nvml_used"] = pynvml.nvmlDeviceGetMemoryInfo(handle).used
    except Exception:  # NVML is optional: a missing driver library must not stop training
        pass
    return out


class MetricsWriter:
    """Appends one JSON object per line to metrics.jsonl; every rank writes to the same file.

    Each line is written with one os.write on an O_APPEND descriptor, so lines from different
    ranks never interleave within a line."""

    def __init__(self, path: Path | None):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if path else None

    def write(self, record: dict) -> None:
        if self.fd is not None:
            os.write(self.fd, (json.dumps(record) + "\n").encode())

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- the records a run writes ----------------------------------------------------------------
def memory(setup) -> dict:
    """This rank's peak memory: the CPU figure (saved tensors + state), or CUDA's allocator."""
    stage = setup.stage
    static = state_bytes(list(stage.modules.values()), stage.optimizers.values())
    out = {"peak_memory_bytes": setup.tracker.peak + static}
    out.update(cuda_memory(setup.env.device))
    if "cuda_max_allocated" in out:
        out["peak_memory_bytes"] = out["cuda_max_allocated"]
    return out


def train_record(setup, clock, step: int, epoch: int, lr: float, images_per_s: float,
                 elapsed: float) -> dict:
    """One metrics.jsonl line for a logging window of `elapsed` seconds on this rank; `clock`
    (engine/p2p.py WaitClock) holds the window's compute and wait seconds."""
    recv, send, compute = (clock.seconds(k) for k in ("recv", "send", "compute"))
    layout = setup.layout
    return {
        "kind": "train", "step": step, "epoch": epoch, "rank": setup.env.rank,
        "replica": layout.replica, "stage": layout.stage, "modules": setup.stage.indices,
        "lr": lr, "losses": {str(k): float(v) for k, v in setup.stage.losses.items()},
        "images_per_s": images_per_s, "compute_frac": compute / elapsed,
        "recv_wait_s": recv, "send_wait_s": send,
        "recv_wait_frac": recv / elapsed, "send_wait_frac": send / elapsed,
        "activation_bytes": setup.tracker.peak, **memory(setup),
    }


def summary(setup, result: dict, train_time: float, images: int, wall: float, step: int,
            epoch: int) -> dict | None:
    """summary.json's content (DESIGN.md's contract), gathered from every rank; on rank 0."""
    from pipemlaan.config import method_label
    from pipemlaan.engine.distributed import gather_all
    cfg, stage, layout = setup.cfg, setup.stage, setup.layout
    K = len(setup.all_modules)
    backbone_sum = 0.0
    for m in stage.modules.values():
        for p in m.body.parameters():
            backbone_sum += p.detach().double().sum().item()
        if m.index == K - 1:
            for p in m.h.parameters():
                backbone_sum += p.detach().double().sum().item()
    mine = {"losses": {k: float(v) for k, v in stage.losses.items()},
            "param_sum": backbone_sum, "train_time": train_time, "skipped": stage.skipped,
            "activation_bytes": setup.tracker.peak, **memory(setup)}
    parts = gather_all(setup.env, mine)
    if setup.env.rank != 0:
        return None
    losses = {}     # each replica's loss is over its slice: the global batch's is the mean
    for p in parts:
        for k, v in p["losses"].items():
            losses[k] = losses.get(k, 0.0) + v / layout.replicas
    slowest = max(p["train_time"] for p in parts)
    skipped: dict[int, int] = {}    # replicas skip together: the same count on each
    for p in parts:
        for k, n in p["skipped"].items():
            skipped[k] = max(skipped.get(k, 0), n)
    return {
        "method": method_label(cfg.method), "model": cfg.model.name,
        "dataset": cfg.data.name, "K": K, "world_size": setup.env.world,
        "replicas": layout.replicas, "stages": layout.stages, "partition": setup.partition,
        "mode": cfg.pipeline.mode, "epochs": epoch, "steps": step, **result,
        "images_per_s": images / slowest if slowest > 0 else 0.0, "wall_s": wall,
        "peak_memory_bytes": [p["peak_memory_bytes"] for p in parts],
        "activation_bytes": [p["activation_bytes"] for p in parts],
        "final_train_loss_per_module": [losses.get(k) for k in range(K)],
        # train.nonfinite=skip: updates dropped per module because a loss or gradient was
        # not finite
        "skipped_updates": {str(k): n for k, n in sorted(skipped.items())},
        "param_checksum": sum(p["param_sum"] for p in parts[:layout.stages]),
        # replicas of a stage must agree: a difference means they drifted apart
        "param_checksum_per_rank": [p["param_sum"] for p in parts],
        "device": str(setup.env.device),
    }


class StepTracer:
    """run.profile_steps: a torch.profiler trace of steps [first, last] on this rank, written to
    <run>/traces/rank<R>.json (Perfetto or chrome://tracing) with the stage's record_function
    names. `at(t)` before each training step; `at(None)` when the run's steps are over."""

    def __init__(self, steps: list[int], folder: Path, env):
        self.steps, self.folder, self.env = steps, folder, env
        self.profiler = self.finished = None

    def at(self, t: int | None) -> None:
        if self.steps and t == self.steps[0]:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if self.env.device.type == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=acts)
            self.profiler.__enter__()
        elif self.profiler is not None and (t is None or t > self.steps[1]):
            self.profiler.__exit__(None, None, None)
            self.folder.mkdir(parents=True, exist_ok=True)
            self.profiler.export_chrome_trace(str(self.folder / f"rank{self.env.rank}.json"))
            # kept alive to the process's end: freeing a finished profiler while gloo's
            # threads run corrupted the heap (torch 2.14, CPU, 2 ranks: a segfault later on)
            self.finished, self.profiler = self.profiler, None
