"""Like-with-like row comparison (shared items, shared subcategories, intervals), Overall, and the routing analysis."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

from prism_lightning.evaluation.stats import bootstrap_interval


def overall(scores: dict[str, float], keys: Optional[Sequence[str]] = None) -> float:
    """Mean of the ``keys`` subcategory scores on 0–100 (MT-Bench already ×10); all keys when None; NaN if none."""
    keys = list(scores) if keys is None else list(keys)
    values = [scores[k] for k in keys]
    return sum(values) / len(values) if values else float("nan")


def scored_by_every_row(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """Items (per-item scores, NaN = unreadable verdict) that every row could score: the rows' common ground."""
    return torch.stack([~v.isnan() for v in values]).all(0)


def shared_subcategories(scores: dict[str, dict[str, float]], subcategories: Sequence[str]) -> tuple[list, list]:
    """(kept, left out): a subcategory enters Overall only when every row has a finite score for it."""
    def present(k: str) -> bool:
        return all(k in s and not math.isnan(s[k]) for s in scores.values())

    return [k for k in subcategories if present(k)], [k for k in subcategories if not present(k)]


def compare_rows(items: dict[str, dict[str, torch.Tensor]], subcategories: Sequence[str], seed: int = 0,
                 overall_exclude: Sequence[str] = ()) -> dict:
    """Scores, 95 % intervals and Overall per row, each subcategory on the items every row scored.

    ``items[row][subcategory]`` holds per-item scores on 0–100 in the same item order for every row (NaN where the
    judge's verdict was unreadable). A row scored on items another row could not score would compare unlike
    samples, so each subcategory keeps only the common items; Overall averages only the subcategories every
    row has, and resamples items within each of them for its interval. ``overall_exclude`` are shown but never
    averaged (a second measure of the same answers).
    """
    common = {k: scored_by_every_row([r[k] for r in items.values() if k in r]) for k in subcategories}
    kept_items = {name: {k: v[common[k]] for k, v in row.items()} for name, row in items.items()}
    scores = {name: {k: float(v.mean()) if len(v) else float("nan") for k, v in row.items()}
              for name, row in kept_items.items()}
    kept, left_out = shared_subcategories(scores, [k for k in subcategories if k not in overall_exclude])
    rows = {name: {"scores": scores[name],
                   "intervals": {k: bootstrap_interval(v, seed=seed) for k, v in row.items()},
                   "overall": overall(scores[name], kept),
                   "overall_ci95": bootstrap_interval([row[k] for k in kept], seed=seed)}
            for name, row in kept_items.items()}
    return {"rows": rows, "compared": {k: int(m.sum()) for k, m in common.items()}, "overall_subcategories": kept,
            "left_out": left_out}


def _correlate(keys: list[str], routing: dict[str, float], effect: list[float]) -> dict:
    """Pearson and Spearman between routing rates and effects over ``keys`` (NaN below 3 points or no spread)."""
    result = {"subcategories": keys, "routing_rate": [routing[k] for k in keys], "persona_effect": effect,
              "pearson": float("nan"), "spearman": float("nan"), "n": len(keys)}
    if len(keys) >= 3:
        x = torch.tensor(result["routing_rate"], dtype=torch.float64)
        y = torch.tensor(effect, dtype=torch.float64)
        if x.std() > 0 and y.std() > 0:
            result["pearson"] = float(pearson_corrcoef(x, y))
            result["spearman"] = float(spearman_corrcoef(x, y))
    return result


def routing_correlation(routing: dict[str, float], base: dict[str, float], expert: dict[str, float]) -> dict:
    """PRISM's routing rate against the persona effect per subcategory; headline relative, ``absolute`` second.

    Relative effect = (Expert − Base) / Base, as the paper reports it, so subcategories on different scales
    (MT-Bench ×10, refusal rates, MMLU accuracy) weigh alike; a Base score of 0 has no relative effect and is
    left out of the headline only. The absolute effect (Expert − Base) is kept under ``absolute``.
    """
    keys = [k for k in routing if k in base and k in expert and not math.isnan(base[k]) and not math.isnan(expert[k])]
    relative = [k for k in keys if base[k] != 0]
    result = _correlate(relative, routing, [(expert[k] - base[k]) / base[k] for k in relative])
    return {**result, "effect": "relative: (Expert − Base) / Base",
            "absolute": {**_correlate(keys, routing, [expert[k] - base[k] for k in keys]),
                         "effect": "absolute: Expert − Base"}}
