"""The study's derived quantities as pure functions: persona effect relative to no persona, the other-persona
control, and their paired bootstrap intervals.

Every condition scores the same items of a subcategory in the same order, so a resample draws item indices once
and applies them to every condition: the intervals are of the differences, not of independent means.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

SAMPLES = 1000


def _common(items: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The items every condition scored (NaN = an unreadable verdict), as float64."""
    keep = torch.stack([~v.isnan() for v in items]).all(0)
    return [v.double()[keep] for v in items]


def paired_bootstrap(items: Sequence[torch.Tensor], statistic: Callable[[list[torch.Tensor]], torch.Tensor],
                     samples: int = SAMPLES, seed: int = 0) -> dict:
    """``statistic`` of the conditions' item means, with a 95 % percentile interval from resampling shared items.

    ``statistic`` maps a list of means (one tensor per condition, any batch shape) to the quantity. Returns the
    point value, the interval and n (items every condition scored); NaN values when n is 0.
    """
    values = _common(items)
    n = len(values[0]) if values else 0
    if n == 0:
        return {"value": float("nan"), "ci95": [float("nan"), float("nan")], "n": 0}
    point = float(statistic([v.mean() for v in values]))
    index = torch.randint(n, (samples, n), generator=torch.Generator().manual_seed(seed))
    draws = statistic([v[index].mean(-1) for v in values])
    draws = draws[~draws.isnan()]
    if len(draws) == 0:
        return {"value": point, "ci95": [float("nan"), float("nan")], "n": n}
    return {"value": point, "ci95": [float(draws.quantile(0.025)), float(draws.quantile(0.975))], "n": n}


def relative(condition: torch.Tensor, none: torch.Tensor) -> torch.Tensor:
    """(condition − none) / none × 100, the paper's relative change; NaN where ``none`` is 0."""
    return torch.where(none != 0, (condition - none) / none.where(none != 0, torch.ones_like(none)) * 100,
                       torch.full_like(none, float("nan")))


def persona_effect(condition: torch.Tensor, none: torch.Tensor, seed: int = 0) -> dict:
    """Effect of a condition against no persona on one subcategory: relative (%) and absolute (points)."""
    rel = paired_bootstrap([condition, none], lambda m: relative(m[0], m[1]), seed=seed)
    diff = paired_bootstrap([condition, none], lambda m: m[0] - m[1], seed=seed)
    return {"relative": rel["value"], "relative_ci95": rel["ci95"], "absolute": diff["value"],
            "absolute_ci95": diff["ci95"], "n": rel["n"]}


def control_gain(matched: torch.Tensor, others: Sequence[torch.Tensor], none: torch.Tensor, seed: int = 0) -> dict:
    """Matched lift minus the mean lift of the non-matched personas (lift = relative change against no persona).

    The paper's "persona alignment score": above 0, the domain of the persona matters; near 0, any persona
    does as well. NaN without a non-matched persona.
    """
    if not others:
        return {"value": float("nan"), "ci95": [float("nan"), float("nan")], "n": 0, "others": 0}

    def gain(m: list[torch.Tensor]) -> torch.Tensor:
        lifts = [relative(x, m[-1]) for x in m[:-1]]
        return lifts[0] - torch.stack(lifts[1:]).mean(0)

    return {**paired_bootstrap([matched, *others, none], gain, seed=seed), "others": len(others)}


def mean_finite(values: Sequence[float]) -> float:
    """Mean of the finite values; NaN when there are none."""
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return sum(kept) / len(kept) if kept else float("nan")
