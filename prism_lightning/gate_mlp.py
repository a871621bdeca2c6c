"""The gate network as a plain ``nn.Module``: shared by training (IntentGate) and inference (GatedModel)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class GateMLP(nn.Module):
    """Maps a hidden state to one routing logit."""

    def __init__(self, hidden_size: int, dims: Sequence[int] = (128, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = hidden_size
        for dim in dims:
            layers += [nn.Linear(width, dim), nn.GELU()]
            width = dim
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Routing logits [B] from features [B, H] (computed in fp32 whatever the backbone's dtype)."""
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self.net(features.float()).squeeze(-1)
