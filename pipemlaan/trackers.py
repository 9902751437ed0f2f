"""Trackers: where a run's figures go besides metrics.jsonl (TensorBoard, Weights & Biases).

A tracker has the two methods torchtitan's loggers have: `log(metrics, step)` takes a flat dict
of scalars, `close()` flushes and closes. `open_trackers` gives the trainer one object (a
fan-out of the trackers that are on, or a null tracker when none is), so the loop never asks
which trackers are on; `scalars(record)` turns a metrics.jsonl record (engine/records.py) into
tags, generically: every numeric field of a record is logged, so fields added to the records
later reach the trackers without a change here.

Every rank logs its own records (the ones it appends to metrics.jsonl), from a thread of its
own (`Threaded`), so tracking costs the pipeline no communication and the loop no waiting:
- TensorBoard: one event folder per rank, <run>/tensorboard/rank<R>, which TensorBoard shows as
  one run per rank: each chart (images/s, wait shares, memory) has a line per rank, each
  module's loss comes from the rank that owns it, the evaluations from rank 0. A resumed run
  appends a new event file and marks its first step (`purge_step`), so TensorBoard drops what
  the interrupted launch logged after its checkpoint instead of drawing it twice.
- Weights & Biases: one W&B run per rank, grouped by the run's name, under <run>/wandb
  (WANDB_MODE=offline writes there without a network; `wandb sync` uploads later).

A tracker whose package is missing (or whose start fails) says so in one line and the run goes
on without it: a long job is not lost to a dashboard.
"""

from __future__ import annotations

import hashlib
import numbers
import os
import queue
import threading
from pathlib import Path

from pipemlaan.ui import console

# fields that say which record this is, not what was measured
IDENTITY = {"kind", "step", "rank", "replica", "stage", "modules"}
MIB = 2 ** 20


class Tracker:
    """The null tracker: logs nothing."""

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class FanOut(Tracker):
    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log(self, metrics, step):
        for t in self.trackers:
            t.log(metrics, step)

    def close(self):
        for t in self.trackers:
            t.close()


class Threaded(Tracker):
    """Logs from a thread of its own, so the training loop only hands over a dict: building
    TensorBoard's summaries and writing them took 1.5 ms a logging window on a busy CPU (44 us
    a scalar), which the loop would otherwise wait for. `close` waits until everything handed
    over is written."""

    def __init__(self, inner: Tracker):
        self.inner = inner
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._work, name="pipemlaan-trackers", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        broken = False
        while (item := self.q.get()) is not None:
            if broken:
                continue
            try:
                self.inner.log(*item)
            except Exception as e:  # noqa: BLE001 - a dashboard must not stop the training
                print(f"trackers: logging failed ({type(e).__name__}: {e}); the run goes on "
                      f"without its dashboards", flush=True)
                broken = True

    def log(self, metrics, step):
        self.q.put((metrics, step))

    def close(self):
        self.q.put(None)
        self.thread.join()
        self.inner.close()


class TensorBoardTracker(Tracker):
    """tensorboard's own SummaryWriter (through torch.utils.tensorboard), flushed after every
    log call: one small write per logging window, and the dashboard is never behind."""

    def __init__(self, folder: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter   # optional: not every box has it
        # purge_step: what an interrupted launch logged after the checkpoint this one starts
        # from (records are stamped with the steps done, so this launch's first is start + 1)
        # is dropped by TensorBoard's reader, and a resumed run's curves do not fold back
        self.writer = SummaryWriter(log_dir=str(folder),
                                    purge_step=start_step + 1 if start_step > 0 else None)

    def log(self, metrics, step):
        if self.writer is None:
            return
        try:
            for tag, v in metrics.items():
                self.writer.add_scalar(tag, v, step)
            self.writer.flush()
        except OSError as e:      # a full disk must not end one rank mid-step, and the run
            print(f"run.tensorboard: cannot write event files ({e.strerror}); TensorBoard "
                  f"logging stops here", flush=True)
            self.writer = None

    def close(self):
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError:
                pass


class WandbTracker(Tracker):
    """One W&B run per rank, grouped by the run's name; resumes the same W&B run when the
    pipemlaan run resumes (its id is derived from the run folder and the rank)."""

    def __init__(self, wandb, folder: Path, rank: int, name: str, config: dict):
        folder.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "pipemlaan"),
                              dir=str(folder), name=f"{name}/rank{rank}", group=name,
                              id=f"{digest}-r{rank}", resume="allow", config=config,
                              reinit="create_new")

    def log(self, metrics, step):
        self.run.log(metrics, step=step)

    def close(self):
        self.run.finish()


def open_trackers(run_dir: Path, rank: int, *, tensorboard: bool, wandb: bool,
                  start_step: int, name: str, config: dict) -> Tracker:
    """The trackers a run asked for (run.tensorboard, run.wandb) as one object."""
    on: list[Tracker] = []
    if tensorboard:
        try:
            on.append(TensorBoardTracker(run_dir / "tensorboard" / f"rank{rank}", start_step))
        except ImportError:
            _say(rank, "run.tensorboard is on but the tensorboard package is not installed: "
                       "pip install tensorboard, or pass --run.tensorboard=false")
    if wandb:
        try:
            import wandb as wandb_module     # optional, and slow to import: only when asked
        except ImportError:
            _say(rank, "run.wandb is on but wandb is not installed (pip install wandb); "
                       "logging to metrics.jsonl and TensorBoard only")
        else:
            try:
                on.append(WandbTracker(wandb_module, run_dir / "wandb", rank, name, config))
            except Exception as e:  # noqa: BLE001 - a dashboard must not stop the training
                _say(rank, f"run.wandb: wandb could not start ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); run `wandb login` "
                           f"or set WANDB_MODE=offline; going on without it")
    if not on:
        return Tracker()
    return Threaded(on[0] if len(on) == 1 else FanOut(on))


def _say(rank: int, line: str) -> None:
    if rank == 0:
        console.print(line, markup=False, highlight=False, soft_wrap=True)   # one line


# ---- a metrics.jsonl record as tags ----------------------------------------------------------
def scalars(record: dict) -> dict[str, float]:
    """The numeric fields of a metrics record as TensorBoard tags ("section/name"): a train
    record's per-module losses under loss/, throughput under throughput/, time shares and
    seconds under time/, memory under memory/ (in MiB), the rest under train/; every other
    kind of record (eval, preempted, ...) under its kind, lists by module."""
    kind = record.get("kind", "train")
    out: dict[str, float] = {}
    for name, v in record.items():
        if name in IDENTITY:
            continue
        if kind == "train" and name == "losses" and isinstance(v, dict):
            for k, x in v.items():
                _put(out, f"loss/module_{k}", x)
            continue
        section = kind if kind != "train" else _section(name)
        if _is_bytes(name) and _is_number(v):
            _put(out, f"{section}/{name.removesuffix('_bytes')}_mib", v / MIB)
            continue
        _put(out, f"{section}/{name}", v)
    return out


def _is_bytes(name: str) -> bool:
    return name.endswith("_bytes") or name.startswith(("cuda_max_", "nvml_"))


def _section(name: str) -> str:
    if _is_bytes(name):
        return "memory"
    if "images_per_s" in name or "flop" in name or name.startswith("peak_"):
        return "throughput"        # peak_share: the share of the device's peak FLOP/s
    if "memory" in name:
        return "memory"
    if name.endswith(("_frac", "_share", "_s")) or "wait" in name:
        return "time"
    return "train"


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _put(out: dict, tag: str, v) -> None:
    """A number as is; a dict or list of numbers one tag per entry (lists by module)."""
    if _is_number(v):
        out[tag] = float(v)
    elif isinstance(v, dict):
        for k, x in v.items():
            _put(out, f"{tag}/{k}", x)
    elif isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            _put(out, f"{tag}/module_{i}", x)
