"""The gate network as a plain ``nn.Module``: shared by training (IntentGate) and inference (GatedModel)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class GateMLP(nn.Module):
    """Maps a hidden state to K adapter logits; the "none" outcome's logit is pinned at 0.

    So P(none) = 1 / (1 + Σ exp z_k), P(route to an adapter) = sigmoid(logsumexp z) — the *open logit* every
    binary view (calibration, AUROC, threshold) reads — and the adapter taken is argmax z. With K = 1 this is
    exactly the binary gate: the open logit is z.
    """

    def __init__(self, hidden_size: int, dims: Sequence[int] = (128, 64), outputs: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = hidden_size
        for dim in dims:
            layers += [nn.Linear(width, dim), nn.GELU()]
            width = dim
        layers.append(nn.Linear(width, outputs))
        self.net = nn.Sequential(*layers)
        self.outputs = outputs

    def adapter_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Per-adapter logits [B, K] from features [B, H] (computed in fp32 whatever the backbone's dtype)."""
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self.net(features.float())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Open logits [B]: log-odds of routing to any adapter rather than to the base."""
        return open_logit(self.adapter_logits(features))


def open_logit(adapter_logits: torch.Tensor) -> torch.Tensor:
    """log Σ_k exp z_k over the adapter logits [..., K]: the log-odds of "some adapter" against "none" (logit 0)."""
    return adapter_logits.squeeze(-1) if adapter_logits.shape[-1] == 1 else torch.logsumexp(adapter_logits, -1)


def route_loss(adapter_logits: torch.Tensor, routes: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over (none, adapter 1..K) with the none logit at 0; ``routes`` 0 = none, k = adapter k.

    With K = 1 this equals the binary cross-entropy of the open logit against the label, which it computes as such.
    """
    if adapter_logits.shape[-1] == 1:
        return nn.functional.binary_cross_entropy_with_logits(adapter_logits.squeeze(-1), routes.float())
    full = torch.cat([torch.zeros_like(adapter_logits[:, :1]), adapter_logits], dim=-1)
    return nn.functional.cross_entropy(full, routes.long())


def soft_route_loss(adapter_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a distribution over (none, adapter 1..K) [B, K + 1], the none logit at 0.

    With K = 1 it is the binary cross-entropy of the open logit against the target's open probability; with
    one-hot targets it equals ``route_loss``.
    """
    if adapter_logits.shape[-1] == 1:
        return nn.functional.binary_cross_entropy_with_logits(adapter_logits.squeeze(-1), targets[:, 1].float())
    full = torch.cat([torch.zeros_like(adapter_logits[:, :1]), adapter_logits], dim=-1)
    return nn.functional.cross_entropy(full, targets.float())


def soft_targets(win_probs: dict[int, float], outputs: int) -> list[float]:
    """The (none, adapter 1..K) target of one query from each adapter's win probability (index 0-based).

    The gate should open as often as the best adapter wins: P(open) = max_k w_k, shared among the adapters in
    proportion to their win probabilities. With K = 1 it is (1 - w, w).
    """
    w = [max(0.0, float(win_probs.get(k, 0.0))) for k in range(outputs)]
    total, opened = sum(w), max(w, default=0.0)
    return [1.0 - opened] + [opened * x / total if total > 0 else 0.0 for x in w]
