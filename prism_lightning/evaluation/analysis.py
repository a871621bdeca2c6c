"""Overall score and the routing analysis (routing rate vs persona effect)."""

from __future__ import annotations

import math

import torch
from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef


def overall(scores: dict[str, float]) -> float:
    """Mean of the subcategory scores on 0–100 (MT-Bench already ×10); NaN subcategories are left out."""
    values = [v for v in scores.values() if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def routing_correlation(routing: dict[str, float], base: dict[str, float], expert: dict[str, float]) -> dict:
    """Pearson and Spearman between PRISM's routing rate and the persona effect (Expert − Base) per subcategory."""
    keys = [k for k in routing if k in base and k in expert and not math.isnan(base[k]) and not math.isnan(expert[k])]
    effect = [expert[k] - base[k] for k in keys]
    result = {"subcategories": keys, "routing_rate": [routing[k] for k in keys], "persona_effect": effect,
              "pearson": float("nan"), "spearman": float("nan"), "n": len(keys)}
    if len(keys) >= 3:
        x = torch.tensor(result["routing_rate"], dtype=torch.float64)
        y = torch.tensor(effect, dtype=torch.float64)
        if x.std() > 0 and y.std() > 0:
            result["pearson"] = float(pearson_corrcoef(x, y))
            result["spearman"] = float(spearman_corrcoef(x, y))
    return result
