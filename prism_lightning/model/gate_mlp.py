"""The gate network as a plain ``nn.Module``: shared by training (IntentGate) and inference (GatedModel)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class FeatureStandardizer(nn.Module):
    """Scales each feature by the running mean and standard deviation of the features seen in training.

    Layer-0 states carry a few dimensions two orders of magnitude larger than the rest; an MLP on them raw, at the
    gate's learning rate, collapses to one output for every query. In training every batch first adds to the
    running statistics (exact pooled mean and variance, so the result does not depend on batch size), then is scaled
    by them (no gradient through them); in eval the stored statistics are used. Buffers: they travel in
    checkpoints and exports.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("m2", torch.zeros(size))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Pool a batch [B, H] into the running statistics (Chan et al.'s parallel update), in the buffers' dtype
        (a strategy such as DeepSpeed may have cast them)."""
        x = x.detach().to(self.mean.dtype)
        n, mean = x.shape[0], x.mean(0)
        delta, total = mean - self.mean, self.count + n
        self.m2 += ((x - mean) ** 2).sum(0) + delta ** 2 * self.count * n / total
        self.mean += delta * n / total
        self.count += n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Standardized features [B, H] (unchanged until two rows have been seen)."""
        if self.training and torch.is_grad_enabled():  # training steps only, never a no-grad routing call
            self.update(x)
        if self.count < 2:
            return x
        std = (self.m2 / (self.count - 1)).sqrt().clamp_min(1e-6)
        return (x - self.mean.to(x.dtype)) / std.to(x.dtype)


class GateMLP(nn.Module):
    """Maps a hidden state to K adapter logits; the "none" outcome's logit is pinned at 0.

    So P(none) = 1 / (1 + Σ exp z_k), P(route to an adapter) = sigmoid(logsumexp z) — the *open logit* every
    binary view (calibration, AUROC, threshold) reads — and the adapter taken is argmax z. With K = 1 this is
    exactly the binary gate: the open logit is z. ``standardize`` puts a ``FeatureStandardizer`` in front (exports
    made before it existed have none).
    """

    def __init__(self, hidden_size: int, dims: Sequence[int] = (128, 64), outputs: int = 1,
                 standardize: bool = False) -> None:
        super().__init__()
        self.norm = FeatureStandardizer(hidden_size) if standardize else None
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
            features = features.float()
            return self.net(self.norm(features) if self.norm is not None else features)

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
