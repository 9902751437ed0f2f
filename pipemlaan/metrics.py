"""Measurements: memory per rank, the metrics.jsonl writer, and profiler traces of chosen steps.
What a run's records hold (a training window's line, summary.json) is engine/records.py's.

Memory on CPU is device-independent and comparable across methods: the peak bytes of tensors
that autograd saved for backward (counted through saved-tensor hooks, each storage once, while
it is alive) plus the bytes of parameters, gradients and optimizer state. On CUDA the same
breakdown comes from a few traced steps at the start, and the figure is the allocator's peak
(torch.cuda.max_memory_allocated, reset when start-up ends, which is reported apart) with
NVML's used memory of the physical GPU the rank runs on (found by UUID: CUDA_VISIBLE_DEVICES,
as SLURM sets it, renumbers the GPUs).
"""

from __future__ import annotations

import json
import os
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch


class SavedTensorTracker:
    """Peak bytes of live tensors saved for backward, each storage counted once. `steps`: track
    only the first `steps` training steps (on CUDA, where a Python hook on every saved tensor
    would cost the GPU time on every step: a few traced steps, before any CUDA graph capture,
    give the breakdown and then the hooks are off); None: every step (CPU)."""

    def __init__(self, enabled: bool = True, steps: int | None = None) -> None:
        self.enabled = enabled
        self.steps = steps
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

    @property
    def always(self) -> bool:
        """Hooks on every step (not only a few traced ones)."""
        return self.enabled and self.steps is None

    @contextmanager
    def track(self):
        if not self.enabled:
            yield
            return
        if self.steps is not None:
            self.steps -= 1
            if self.steps <= 0:
                self.enabled = False      # this step is the last one traced
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
    """The allocator's peaks since the last `reset_peaks` (start-up excluded: the trainer
    resets them before the first step), NVML's used memory of the physical GPU this rank
    runs on, and the device's total memory."""
    if device.type != "cuda":
        return {}
    out = {"cuda_max_allocated": torch.cuda.max_memory_allocated(device),
           "cuda_max_reserved": torch.cuda.max_memory_reserved(device),
           "device_total_bytes": torch.cuda.get_device_properties(device).total_memory}
    handle = nvml_handle(device)
    if handle is not None:
        import pynvml
        out["nvml_used"] = pynvml.nvmlDeviceGetMemoryInfo(handle).used
    return out


def reset_peaks(device: torch.device) -> dict:
    """Ends start-up for the memory figures: returns start-up's peaks (reported apart) and
    resets the allocator's, so a rank's training peak counts its own training only."""
    if device.type != "cuda":
        return {}
    torch.cuda.synchronize(device)
    startup = {"startup_max_allocated": torch.cuda.max_memory_allocated(device)}
    torch.cuda.reset_peak_memory_stats(device)
    return startup


def gpu_candidates(logical: int, visible: str | None, uuid: str | None
                   ) -> list[tuple[str, object]]:
    """Ways to name, to NVML, the physical GPU behind logical CUDA device `logical`, best first:
    ("uuid", "GPU-...") or ("index", n). NVML numbers GPUs by PCI bus, whatever
    CUDA_VISIBLE_DEVICES (which SLURM sets) and CUDA_DEVICE_ORDER say, so the logical index is
    the right NVML index only when neither remaps: the UUID torch reports is the sure name,
    then the CUDA_VISIBLE_DEVICES entry (an index or a UUID)."""
    out: list[tuple[str, object]] = []
    if uuid:
        out.append(("uuid", uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"))
    if visible is not None and visible.strip():
        entries = [e.strip() for e in visible.split(",") if e.strip()]
        if logical < len(entries):
            e = entries[logical]
            out.append(("index", int(e)) if e.isdigit() else ("uuid", e))
    else:
        out.append(("index", logical))
    return out


_NVML: dict = {}


def nvml_handle(device: torch.device):
    """NVML's handle of the physical GPU this rank uses, or None (no driver library, or no
    name NVML knows): NVML is optional and must never stop training."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index in _NVML:
        return _NVML[index]
    handle = None
    try:
        import pynvml
        pynvml.nvmlInit()
        uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", "") or "")
        for kind, name in gpu_candidates(index, os.environ.get("CUDA_VISIBLE_DEVICES"), uuid):
            try:
                handle = (pynvml.nvmlDeviceGetHandleByUUID(name) if kind == "uuid"
                          else pynvml.nvmlDeviceGetHandleByIndex(name))
                break
            except pynvml.NVMLError:
                continue
    except Exception:  # noqa: BLE001 - no NVML library or driver
        handle = None
    _NVML[index] = handle
    return handle


def host_total_bytes() -> int:
    """Physical memory of this machine: what a CPU rank's share of the device is taken of."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


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
