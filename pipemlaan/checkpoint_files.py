"""Checkpoint files: one file per local module (weights, heads, optimizer state, LAM state),
written atomically and checked on reading. What a rank puts in them is
engine/checkpoint_state.py's.

Layout: `<run>/checkpoints/step_<S>/module_<k>.pt` plus `meta.json` (step, epoch, the sha256 of
every module file). Each rank writes the files of the modules it owns; rank 0 writes meta.json
last, so a checkpoint without meta.json is incomplete and ignored. Every file is written to a
temporary name, fsynced and renamed, so it is either whole or absent. Because files are per
module, a run can resume with any number of ranks. Loading verifies the checksums and falls
back, with a warning, to the newest checkpoint that is intact. `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import warnings
from pathlib import Path

import torch

KEEP = 2


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_module_file(path: Path, state: dict) -> str:
    """Writes one module's state atomically; returns its sha256."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def write_meta(run_dir: Path, step: int, meta: dict, checksums: dict[str, str]) -> None:
    d = step_dir(run_dir, step)
    atomic_write_bytes(d / "meta.json", json.dumps({**meta, "step": step,
                                                    "files": checksums}, indent=1).encode())
    old = sorted(p for p in (run_dir / "checkpoints").glob("step_*")
                 if (p / "meta.json").exists())[:-KEEP]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)


def _intact(d: Path) -> dict | None:
    try:
        meta = json.loads((d / "meta.json").read_text())
        for name, digest in meta["files"].items():
            if hashlib.sha256((d / name).read_bytes()).hexdigest() != digest:
                return None
        return meta
    except (OSError, ValueError, KeyError):
        return None


def latest_checkpoint(run_dir: Path) -> tuple[Path, dict] | None:
    """The newest complete, intact checkpoint; warns about each newer broken one."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    for d in sorted(root.glob("step_*"), reverse=True):
        if not (d / "meta.json").exists():
            continue
        meta = _intact(d)
        if meta is not None:
            return d, meta
        warnings.warn(f"checkpoint {d} is truncated or corrupted (checksum mismatch); "
                      f"using an older one", stacklevel=2)
    return None


def load_module_file(path: Path, device: torch.device) -> dict:
    return torch.load(path, map_location=device, weights_only=True)
