"""Learning-rate schedule: linear warm-up from `warmup_lr`, then cosine decay to zero.

The horizon is `epochs * steps_per_epoch` even when `train.max_steps` stops the run earlier,
so a short run is an exact prefix of the full one.
"""

from __future__ import annotations

import math

from pipemlaan.config import TrainConfig


def lr_at(step: int, steps_per_epoch: int, t: TrainConfig) -> float:
    total = t.epochs * steps_per_epoch
    warm = int(round(t.warmup_epochs * steps_per_epoch))
    if step < warm:
        return t.warmup_lr + (t.lr - t.warmup_lr) * step / warm
    progress = (step - warm) / max(total - warm, 1)
    return 0.5 * t.lr * (1.0 + math.cos(math.pi * min(progress, 1.0)))
