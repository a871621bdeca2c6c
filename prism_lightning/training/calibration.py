"""Gate calibration math as pure functions: ECE, temperature scaling, threshold choice, reliability diagram."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_calibration_error

from prism_lightning.training.gate_verdict import TEMPERATURE_CLAMP


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 10) -> float:
    """Binary ECE (L1, equal-width bins) from torchmetrics."""
    return float(binary_calibration_error(probs.float(), labels.long(), n_bins=n_bins, norm="l1"))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, steps: int = 100) -> float:
    """The temperature T > 0 that minimises the BCE of ``logits / T`` (Guo et al. 2017), fitted with LBFGS.

    Works under ``prism validate`` too, where Lightning runs in inference mode: the fit leaves it locally and
    works on normal (non-inference) copies of the inputs.
    """
    with torch.inference_mode(False), torch.enable_grad():
        logits, labels = logits.detach().float().clone(), labels.detach().float().clone()
        log_t = torch.zeros((), requires_grad=True)
        optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.binary_cross_entropy_with_logits(logits / log_t.exp(), labels)
            loss.backward()
            return loss

        optimizer.step(closure)
    low, high = TEMPERATURE_CLAMP
    return float(log_t.detach().exp().clamp(low, high).item())


def select_threshold(probs: torch.Tensor, labels: torch.Tensor, method: str = "balanced_accuracy",
                     target_rate: Optional[float] = None) -> float:
    """A routing threshold: the one with the best balanced accuracy, or the one that routes ``target_rate`` of items."""
    probs, labels = probs.float(), labels.long()
    if method == "routing_rate":
        if target_rate is None or not 0 < target_rate < 1:
            raise ValueError("method routing_rate needs 0 < target_rate < 1")
        return float(torch.quantile(probs, 1 - target_rate))
    if method != "balanced_accuracy":
        raise ValueError(f"method must be balanced_accuracy or routing_rate, got {method!r}")
    values = torch.unique(probs)
    candidates = torch.cat([values[:1] - 1e-6, (values[1:] + values[:-1]) / 2, values[-1:] + 1e-6])
    best, best_score = 0.5, -1.0
    for t in candidates.tolist():
        routed = probs >= t
        recalls = [float(routed[labels == 1].float().mean()) if (labels == 1).any() else 0.0,
                   float((~routed[labels == 0]).float().mean()) if (labels == 0).any() else 0.0]
        score = sum(recalls) / 2
        if score > best_score + 1e-12 or (abs(score - best_score) <= 1e-12 and abs(t - 0.5) < abs(best - 0.5)):
            best, best_score = t, score
    return float(best)


def reliability_diagram(probs: torch.Tensor, labels: torch.Tensor, path: Path, n_bins: int = 10,
                        title: str = "") -> Path:
    """Save a reliability diagram (accuracy vs confidence per bin) as PNG."""
    import matplotlib  # lazy: only when a plot is written

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = torch.linspace(0, 1, n_bins + 1)
    index = torch.bucketize(probs.clamp(0, 1 - 1e-7), edges[1:])
    centres, observed, counts = [], [], []
    for b in range(n_bins):
        mask = index == b
        if mask.any():
            centres.append(float(probs[mask].mean()))
            observed.append(float(labels[mask].float().mean()))
            counts.append(int(mask.sum()))
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], "--", color="grey")
    ax.scatter(centres, observed, s=[20 + 4 * c for c in counts])
    ax.set_xlabel("gate probability (mean per bin)")
    ax.set_ylabel("share labelled distill")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
