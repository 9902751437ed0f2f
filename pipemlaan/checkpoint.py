"""Checkpoints: one file per local module (weights, heads, optimizer state, LAM snapshot), and
the policy of which rank writes and reads which (`save`, `resume`).

Layout: `<run>/checkpoints/step_<S>/module_<k>.pt` plus `meta.json` (step, epoch, the sha256 of
every module file). Each rank writes the files of the modules it owns; rank 0 writes meta.json
last, so a checkpoint without meta.json is incomplete and ignored. Every file is written to a
temporary name, fsynced and renamed, so it is either whole or absent. Because files are per
module, a run can resume with any number of ranks. Loading verifies the checksums and falls
back, with a warning, to the newest checkpoint that is intact. `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
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
    import io
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


# ---- the policy: what a rank writes and reads ------------------------------------------------
def save(setup, step: int, epoch: int, batch_in_epoch: int) -> None:
    """Writes this rank's modules (replica 0 only: replicas hold identical weights), then rank 0
    writes meta.json once every rank's files are on disk."""
    from pipemlaan.engine.distributed import agree, barrier, gather_all
    from pipemlaan.errors import PipemlaanError
    env, stage, lam = setup.env, setup.stage, setup.lam
    run_dir = setup.cfg.run_dir
    d = step_dir(run_dir, step)
    sums, error = {}, None
    mine = stage.modules.items() if setup.layout.replica == 0 else []
    try:
        d.mkdir(parents=True, exist_ok=True)
        for k, mod in mine:
            state = {"module": mod.state_dict(), "optimizer": stage.optimizers[k].state_dict(),
                     "lam_snapshot": lam.state(k) if lam else None}
            name = f"module_{k:03d}.pt"
            sums[name] = save_module_file(d / name, state)
    except OSError as e:
        error = PipemlaanError(f"cannot write checkpoint {d} ({e.strerror}); free disk "
                               f"space or choose another --run.dir; earlier checkpoints "
                               f"are intact")
    agree(env, error)
    merged = {}
    for part in gather_all(env, sums):
        merged.update(part)
    if env.rank == 0:
        write_meta(run_dir, step, {"epoch": epoch, "batch_in_epoch": batch_in_epoch,
                                   "K": len(setup.all_modules), "world_size": env.world,
                                   "replicas": setup.layout.replicas}, merged)
    barrier(env)


def resume(setup) -> tuple[int, int, int]:
    """Loads this rank's modules from the newest intact checkpoint; (step, epoch, batch)."""
    from pipemlaan.engine.distributed import broadcast
    from pipemlaan.errors import ConfigError
    env, stage, lam = setup.env, setup.stage, setup.lam
    run_dir = setup.cfg.run_dir
    found = latest_checkpoint(run_dir) if env.rank == 0 else None
    found = broadcast(env, (str(found[0]), found[1]) if found else None)
    if found is None:
        raise ConfigError(f"--run.resume=true but {run_dir} holds no complete checkpoint")
    d, meta = Path(found[0]), found[1]
    if meta["K"] != len(setup.all_modules):
        raise ConfigError(f"checkpoint {d} has K={meta['K']} modules but model.K gives "
                          f"{len(setup.all_modules)}; resume with the same model.K")
    for k, mod in stage.modules.items():
        state = load_module_file(d / f"module_{k:03d}.pt", env.device)
        mod.load_state_dict(state["module"])
        stage.optimizers[k].load_state_dict(state["optimizer"])
        if lam and state["lam_snapshot"] is not None:
            lam.load_state(k, state["lam_snapshot"])
    if env.rank == 0:
        from pipemlaan.ui import console
        console.print(f"resumed from {d} at step {meta['step']} (epoch {meta['epoch']})")
    return meta["step"], meta["epoch"], meta["batch_in_epoch"]
