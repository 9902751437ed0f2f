"""What the tests that start real training processes share: the launch command and its clean
environment (benchmarks/launch.py, the same as the benchmarks'), processes in sessions of their
own that a failing test kills with everything they started, polling for what a run wrote, and
reading its checkpoints.

Not a test module; imported by test_pipeline, test_faults, test_preempt, test_order, test_soak
and test_pipelining_bp.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

# PYTHON, TORCHRUN and REPO are handed on to the test modules
from benchmarks.launch import PYTHON, TORCHRUN, run_env, train_command  # noqa: F401
from benchmarks.launch import ROOT as REPO


def launch_env(**extra: str) -> dict[str, str]:
    """A launch's environment: one thread per rank, plus `extra`."""
    return run_env(1, **extra)


RUN_TIMEOUT_S = 240      # any launch that should finish: a hang fails the test
ERROR_LINE = re.compile(r"^pipemlaan: error: .+$", re.M)


# ---- launching -------------------------------------------------------------------------------
def _env(**extra: str) -> dict[str, str]:
    # rich wraps console lines at 80 columns when not on a terminal
    return launch_env(COLUMNS="1000", **extra)


def unique_name(prefix: str) -> str:
    """A run name no other process on the machine carries: it marks this test's processes."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def train_cmd(ranks: int, args: list[str], *, restarts: int = 0) -> list[str]:
    return train_command(ranks, args, torchrun_args=("--monitor-interval=0.5",
                                                     f"--max-restarts={restarts}"))


class Proc:
    """A process in a session of its own, stdout and stderr going to files."""

    def __init__(self, cmd: list[str], logs: Path, env: dict[str, str] | None = None):
        self.cmd = cmd
        logs.parent.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = logs.with_suffix(".out"), logs.with_suffix(".err")
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")
        self.t0 = time.monotonic()
        self.popen = subprocess.Popen(cmd, cwd=REPO, env=env or _env(), stdout=self._out,
                                      stderr=self._err, start_new_session=True)
        self.pid = self.popen.pid
        self.workers: set[int] = set()   # torchrun's workers seen so far (own sessions)

    def wait(self, timeout: float) -> int:
        """The exit status; a process still running after `timeout` fails the test."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running after {timeout:.0f} s: {' '.join(self.cmd)}\n"
                        f"{self.describe()}")

    def poll(self) -> int | None:
        return self.popen.poll()

    @property
    def stdout(self) -> str:
        if not self._out.closed:
            self._out.flush()
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        if not self._err.closed:
            self._err.flush()
        return self.err_path.read_text(errors="replace")

    def describe(self) -> str:
        return (f"$ {' '.join(self.cmd)}\nexit {self.popen.poll()}\n--- stdout (tail) ---\n"
                f"{self.stdout[-3000:]}\n--- stderr (tail) ---\n{self.stderr[-6000:]}")

    def remember_workers(self) -> set[int]:
        self.workers |= descendants(self.pid)
        return self.workers

    def kill(self) -> None:
        """SIGKILL to this process's group and to the group of every worker it started."""
        self.remember_workers()
        for pid in [self.pid, *self.workers]:
            kill_tree(pid)
        try:
            self.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        self._out.close()
        self._err.close()


def kill_tree(pid: int) -> None:
    """SIGKILL `pid`'s process group when `pid` leads one (never ours), else `pid` alone."""
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return
    try:
        if pgid == pid and pgid != os.getpgrp():
            os.killpg(pgid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _ppids() -> dict[int, int]:
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # the command name (field 2) may hold spaces: the fields after it follow the last ')'
        out[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def descendants(pid: int) -> set[int]:
    ppids, found, frontier = _ppids(), set(), {pid}
    while frontier:
        children = {c for c, p in ppids.items() if p in frontier and c not in found}
        found |= children
        frontier = children
    return found


def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0")
                if "=" in item)


def marked(marker: str) -> list[int]:
    """Processes whose command line carries `marker` (this test's unique run name)."""
    res = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True, timeout=30)
    return [int(p) for p in res.stdout.split()]


@contextmanager
def launched(cmds: list[tuple[list[str], Path, dict | None]], marker: str):
    """Starts the commands; on the way out kills every one of them, their workers and any
    process carrying `marker`, so a failing test leaves nothing behind."""
    procs: list[Proc] = []
    try:
        for cmd, logs, env in cmds:
            procs.append(Proc(cmd, logs, env))
        yield procs
    finally:
        for p in procs:
            p.kill()
        for pid in marked(marker):
            kill_tree(pid)


def run_to_end(cmd: list[str], logs: Path, marker: str, timeout: float = RUN_TIMEOUT_S,
               env: dict | None = None) -> Proc:
    with launched([(cmd, logs, env)], marker) as (proc,):
        proc.wait(timeout)
        proc.seconds = time.monotonic() - proc.t0
        proc.stdout_text, proc.stderr_text = proc.stdout, proc.stderr
        return proc


def wait_until(predicate, timeout: float, procs: list[Proc], what: str, every: float = 0.1):
    """Polls `predicate` until true; fails if a process exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for p in procs:
            p.remember_workers()
            if p.poll() is not None:
                pytest.fail(f"exited before {what}:\n{p.describe()}")
        time.sleep(every)
    pytest.fail(f"no {what} after {timeout:.0f} s:\n" + "\n".join(p.describe() for p in procs))


def train_ranks(metrics: Path) -> set[int]:
    """Ranks that have written a training line to metrics.jsonl so far."""
    if not metrics.is_file():
        return set()
    ranks = set()
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:   # a line being written
            continue
        if rec.get("kind") == "train":
            ranks.add(int(rec["rank"]))
    return ranks


def error_lines(text: str) -> list[str]:
    return ERROR_LINE.findall(text)


def worker_tracebacks(text: str) -> int:
    """Python tracebacks in a launch's output, torchrun's own failure report excepted."""
    lines = text.splitlines()
    return sum(1 for i, line in enumerate(lines)
               if line.endswith("Traceback (most recent call last):")
               and not (i + 1 < len(lines) and "torchrun" in lines[i + 1]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def complete_checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / "checkpoints").glob("step_*")
                  if (p / "meta.json").is_file())


def flat_tensors(obj, prefix: str = "") -> dict[str, object]:
    """Every leaf of a (nested) checkpoint state, by path: tensors and plain values."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(flat_tensors(v, f"{prefix}/{k}"))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(flat_tensors(v, f"{prefix}[{i}]"))
        return out
    return {prefix: obj}
