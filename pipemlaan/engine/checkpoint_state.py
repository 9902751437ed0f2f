"""What a rank puts in a checkpoint and takes back from one: the modules it owns (weights, heads,
optimizer state), each twin's current snapshot and the LAM history of the blocks a module holds
(engine/lam.py [Note: LAM history]).

Files and their integrity (atomic writes, sha256, meta.json, which checkpoint is the newest
intact one) are pipemlaan/checkpoint_files.py's; when a checkpoint is written, and the
collectives around it, are the schedule's (engine/schedule.py `RankSchedule.checkpoint`),
executed by the trainer.
Only replica 0 writes module files: replicas hold identical weights. Files are per module, so
a run resumes on any number of ranks.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipemlaan import checkpoint_files as ckpt
from pipemlaan.errors import ConfigError, PipemlaanError


def write_module_files(run_dir: Path, step: int, stage, lam, replica: int
                       ) -> tuple[dict[str, str], str | None]:
    """Writes this rank's module files for `step`; returns (file name -> sha256, None) or
    ({}, the error line) when the disk refuses (every rank then stops with it)."""
    d = ckpt.step_dir(run_dir, step)
    sums: dict[str, str] = {}
    if replica != 0:
        return sums, None
    try:
        d.mkdir(parents=True, exist_ok=True)
        for k, mod in stage.modules.items():
            state = {"module": mod.state_dict(), "optimizer": stage.optimizers[k].state_dict(),
                     "lam_snapshot": lam.state(k) if lam else None,
                     "lam_history": (lam.history_of(range(mod.block_range[0],
                                                          mod.block_range[1] + 1))
                                     if lam else None)}
            name = f"module_{k:03d}.pt"
            sums[name] = ckpt.save_module_file(d / name, state)
    except OSError as e:
        return {}, (f"cannot write checkpoint {d} ({e.strerror}); free disk space or choose "
                    f"another --run.dir; earlier checkpoints are intact")
    return sums, None


def raise_first_error(parts: list[tuple[dict[str, str], str | None]], rank: int) -> dict:
    """After every rank's (checksums, error) arrived: raises the first error (naming the rank
    that hit it, so every rank stops with the same line), else returns the merged checksums."""
    merged: dict[str, str] = {}
    for r, (sums, error) in enumerate(parts):
        if error is not None:
            raise PipemlaanError(error if r == rank else f"rank {r}: {error}")
        merged.update(sums)
    return merged


def load(d: Path, meta: dict, stage, lam, num_modules: int, device: torch.device) -> None:
    """Loads this rank's modules (and their LAM state) from checkpoint folder `d`."""
    if meta["K"] != num_modules:
        raise ConfigError(f"checkpoint {d} has K={meta['K']} modules but model.K gives "
                          f"{num_modules}; resume with the same model.K")
    for k, mod in stage.modules.items():
        state = ckpt.load_module_file(d / f"module_{k:03d}.pt", device)
        mod.load_state_dict(state["module"])
        stage.optimizers[k].load_state_dict(state["optimizer"])
        if lam:
            lam.load_state(k, state["lam_snapshot"], state.get("lam_history"))
