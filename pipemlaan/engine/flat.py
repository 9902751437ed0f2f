"""One flat tensor for many: what LAM weights and replica gradients travel as (one message or
one all-reduce instead of one per tensor)."""

from __future__ import annotations

import torch


def flatten(tensors: list[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """The tensors' values end to end (cast to `dtype` if given), detached."""
    return torch.cat([t.detach().reshape(-1) if dtype is None else
                      t.detach().reshape(-1).to(dtype) for t in tensors])


def unflatten(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of `flat` shaped (and cast) like `like`, in order."""
    out, i = [], 0
    for t in like:
        out.append(flat[i:i + t.numel()].view_as(t).to(t.dtype))
        i += t.numel()
    return out
