"""Auxiliary heads for token features: the output of a ViT's encoder layers, (N, L, C), or of
any registered backbone whose blocks give tokens or plain vectors, (N, C)
(models/registry.py `features="tokens"`).

- `TokenHead`, the DGL-style head: LayerNorm, token pooling (the mean over tokens, or the
  class token, method.token_pool), then an MLP (C -> hidden -> classes, GELU) as a ViT's own
  MLP; hidden = method.head_width, else 4C. It is the g of every dgl variant and what ends a
  leap network under heads=reference.
- `TokenLinearHead`: LayerNorm, pooling, one linear layer: the plain MLAAN variant (linear)
  and every compact leap head.

The mean is the default pooling: an early layer's class token has gathered little from the
patches yet (it is only attended to by the layers after it), while every patch token carries
its own patch. The network's own classifier reads the class token, as torchvision's ViT does.

InfoPro has no token version: its decoder reconstructs the image from a feature map with
convolutions, and tokens have no sound decoder here (a ViT's patch tokens could be folded
back to a map, but its class token and a user's vectors cannot); config validation says so.
"""

from __future__ import annotations

import torch
from torch import nn

from pipemlaan.local.heads import _CrossEntropyHead


def pool_tokens(x: torch.Tensor, pool: str) -> torch.Tensor:
    """(N, L, C) -> (N, C) by the mean over tokens or the first (class) token; (N, C) as is."""
    if x.dim() == 2:
        return x
    return x[:, 0] if pool == "cls" else x.mean(dim=1)


class TokenHead(_CrossEntropyHead):
    def __init__(self, dim: int, num_classes: int, hidden: int = 0, pool: str = "mean"):
        super().__init__()
        self.pool = pool
        self.norm = nn.LayerNorm(dim)
        hidden = hidden or 4 * dim
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, num_classes))

    def logits(self, x):
        return self.mlp(pool_tokens(self.norm(x), self.pool))


class TokenLinearHead(_CrossEntropyHead):
    def __init__(self, dim: int, num_classes: int, pool: str = "mean"):
        super().__init__()
        self.pool = pool
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def logits(self, x):
        return self.fc(pool_tokens(self.norm(x), self.pool))
