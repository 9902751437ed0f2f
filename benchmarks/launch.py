"""Starting training runs the way a user does, and saying what machine they ran on: one place for
the benchmarks (throughput, study, time to accuracy) and the tests (tests/launching.py).

- `train_command(ranks, flags)`: `python -m pipemlaan.train` alone, or under torchrun with a
  fresh rendezvous (`--standalone`) for more than one rank;
- `run_env(threads)`: this process's environment without torchrun's per-worker variables (a
  launch from inside a worker must not hand them on), with the threads per rank set;
- `run(cmd, env, timeout)`: runs a command in a process group of its own, so that a time-out, or
  the caller being stopped, ends torchrun's workers too (they would hold on to cores or a GPU);
  a failure raises with the end of the run's stderr;
- `machine()`: the machine a result was measured on.
"""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))

# set by torchrun for its workers: a launch from inside one must not hand them on
_INHERITED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
              "MASTER_ADDR", "MASTER_PORT")
_children: list[subprocess.Popen] = []


def train_command(ranks: int, flags: list[str], *, program: list[str] | None = None,
                  torchrun_args: tuple[str, ...] = ()) -> list[str]:
    """The command of a training launch on `ranks` ranks (one process when ranks <= 1)."""
    program = program or ["-m", "pipemlaan.train"]
    if ranks <= 1:
        return [PYTHON, *program, *flags]
    return [TORCHRUN, "--standalone", f"--nproc_per_node={ranks}", *torchrun_args, *program,
            *flags]


def run_env(threads: int = 1, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in _INHERITED and not k.startswith("TORCHELASTIC_")}
    env["OMP_NUM_THREADS"] = str(threads)
    env.update(extra)
    return env


def run(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    _children.append(proc)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        end(proc)
        proc.communicate()
        raise RuntimeError(f"timed out after {timeout:.0f} s: {' '.join(cmd[:6])} ...") from None
    finally:
        _children.remove(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def end(proc: subprocess.Popen) -> None:
    """SIGKILL to a run's process group: torchrun and every worker it started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def end_all_on_signal() -> None:
    """A benchmark stopped by SIGTERM/SIGINT ends the runs it started, then exits."""
    def stopped(signum, _frame):
        for proc in list(_children):
            end(proc)
        sys.exit(128 + signum)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stopped)


def machine() -> dict:
    import torch
    return {"python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
