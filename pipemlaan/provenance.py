"""What made a run: the command line, the code's git commit, library versions, and the machines
and devices of every rank, kept for every start of the run.

A run folder gets `starts/<NNN>/config.toml` and `starts/<NNN>/provenance.json` for each start
(the first, then each resume or torchrun restart), numbered in order and never overwritten;
`config.toml` at the top of the folder stays the configuration of the latest start (the file
benchmarks and `load_config` read back). `this_rank()` is what each rank contributes (gathered
at start-up by engine/setup.py); `write_start` is called by rank 0.
"""

from __future__ import annotations

import json
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent


def this_rank(rank: int, device: torch.device) -> dict:
    """This rank's host and device."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"rank": rank, "host": socket.gethostname(), "device": str(device),
            "device_name": name}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def git_state(folder: Path = PACKAGE_DIR) -> dict:
    """{"commit": sha, "dirty": bool} of the checkout holding `folder`; nulls when it is not a
    git checkout (an installed package) or git is missing."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True,
                                  text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit.strip(), "dirty": None if status is None else bool(status.strip())}


def versions() -> dict:
    nccl = None
    if torch.cuda.is_available():
        try:
            nccl = ".".join(str(v) for v in torch.cuda.nccl.version())
        except (AttributeError, RuntimeError):
            pass
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": (torch.backends.cudnn.version()
                                                  if torch.backends.cudnn.is_available()
                                                  else None),
            "nccl": nccl}


def collect(ranks: list[dict], **extra) -> dict:
    """provenance.json's content: this process's command line, code and versions, every
    rank's host and device (`ranks`, from `this_rank`), and `extra` (the world's shape)."""
    return {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "argv": list(sys.argv), "executable": sys.executable, "git": git_state(),
            "versions": versions(), **extra, "ranks": ranks}


def write_start(run_dir: Path, config_toml: str, provenance: dict) -> Path:
    """Writes this start's files under run_dir/starts/<next number>/ and the latest
    config.toml; returns the start's folder."""
    starts = run_dir / "starts"
    starts.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name) for p in starts.iterdir() if p.name.isdigit()]
    folder = starts / f"{max(taken, default=-1) + 1:03d}"
    folder.mkdir()
    (folder / "config.toml").write_text(config_toml)
    (folder / "provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")
    (run_dir / "config.toml").write_text(config_toml)
    return folder
