"""Measurements: memory per rank, the metrics.jsonl writer, and profiler traces of chosen steps.
What a run's records hold (a training window's line, summary.json) is engine/records.py's.

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
