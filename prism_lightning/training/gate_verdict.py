"""Plain-words verdict on a held-out gate: AUROC with its interval, probability spread, calibration clamp."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torchmetrics.functional.classification import binary_auroc

from prism_lightning.bootstrap.reliability import reliability_text
from prism_lightning.utils.stats import wilson_interval

TEMPERATURE_CLAMP = (0.05, 20.0)  # fit_temperature's bounds: a fit that lands on one found no usable scale


def auroc_interval(probs: torch.Tensor, labels: torch.Tensor, z: float = 1.96) -> tuple[float, float, float]:
    """AUROC and a 95 % interval: the wider of Hanley & McNeil's (1982) and a Wilson interval on the smaller class.

    Hanley-McNeil's standard error collapses to 0 at AUROC 0 or 1 and at tiny n (one item per class gives
    [1, 1]); the Wilson interval with n = min(n_pos, n_neg) keeps a small held-out split honestly wide.
    """
    labels = labels.long()
    n1, n0 = int(labels.sum()), int((1 - labels).sum())
    if n1 == 0 or n0 == 0:
        return float("nan"), 0.0, 1.0
    a = float(binary_auroc(probs.float(), labels))
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = math.sqrt(max(a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n0 - 1) * (q2 - a * a), 0.0) / (n1 * n0))
    n = min(n1, n0)
    w_low, w_high = wilson_interval(round(a * n), n, z)
    return a, max(0.0, min(a - z * se, w_low)), min(1.0, max(a + z * se, w_high))


@dataclass(frozen=True)
class GateVerdict:
    """What the held-out gate shows, and whether it is better than chance."""

    auroc: float
    low: float
    high: float
    n: int
    spread: float
    temperature: float
    informative: bool
    text: str


def gate_verdict(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                 reliability: Optional[dict] = None) -> GateVerdict:
    """Judge the gate from held-out raw logits and labels; ``text`` says what to change when it is uninformative,
    and quotes the labels' reliability (the corpus manifest's ``labels``) when it is given."""
    probs = torch.sigmoid(logits.float() / temperature)
    auroc, low, high = auroc_interval(probs, labels)
    spread = float(probs.max() - probs.min()) if len(probs) else 0.0
    clamped = any(math.isclose(temperature, bound) for bound in TEMPERATURE_CLAMP)
    reasons = []
    if math.isnan(auroc):
        reasons.append("the held-out split has one class only")
    elif low <= 0.5:
        reasons.append("its AUROC interval includes chance (0.5)")
    if clamped:
        reasons.append(f"calibration temperature hit its bound ({temperature:g})")
    if spread < 0.01:
        reasons.append(f"all its probabilities lie within {spread:.4f} of each other")
    head = (f"Gate: held-out AUROC {auroc:.2f} (95% CI {low:.2f}–{high:.2f}, n = {len(labels)}), "
            f"probabilities span {float(probs.min()):.4f}–{float(probs.max()):.4f}, temperature {temperature:.2f}.")
    if reasons:
        text = (head + " The gate is no better than chance (" + "; ".join(reasons) + "): its routes are "
                "arbitrary. Change: more queries (data.queries.per_persona), a judge whose control accuracy is above "
                "chance (data.judge.model), more epochs or a different model.init_args.gate_lr; and check that "
                "anything in a query predicts the labels at all (bench/label_separability.py).")
    else:
        text = head + " The gate separates distill from retain items better than chance."
    if reliability is not None:
        text += " " + reliability_text(reliability)
    return GateVerdict(auroc, low, high, len(labels), spread, temperature, not reasons, text)
