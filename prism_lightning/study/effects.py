"""The study's derived quantities as pure functions: persona effect relative to no persona, the other-persona
control, and their paired bootstrap intervals (``utils.stats``: scipy, BCa where defined).

Every condition scores the same items of a subcategory in the same order, so a resample draws item indices once
and applies them to every condition: the intervals are of the differences, not of independent means. A statistic
that is undefined in some resamples (a relative change over a no-persona score of 0) gets no interval, and says
why; so does a cell of fewer than 5 items.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from prism_lightning.utils.stats import bootstrap_interval

ZERO_BASE = "no-persona score is 0"


def _common(items: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """The items every condition scored (NaN = an unreadable verdict), as float64 arrays."""
    keep = torch.stack([~v.isnan() for v in items]).all(0)
    return [v.double()[keep].numpy() for v in items]


def paired_bootstrap(items: Sequence[torch.Tensor], statistic: Callable[[list], np.ndarray], seed: int = 0,
                     undefined: str = "the statistic is undefined") -> dict:
    """``statistic`` of the conditions' item means with a paired 95 % bootstrap interval of shared items.

    ``statistic`` maps a list of means (one array per condition, any shape) to the quantity. Returns the point
    value, ``ci95`` ([low, high], or None with ``no_interval`` saying why) and n (items every condition scored).
    """
    values = _common(items)
    n = len(values[0]) if values else 0
    if n == 0:
        return {"value": float("nan"), "ci95": None, "n": 0, "no_interval": "no items scored by every condition"}
    point = float(statistic([np.asarray(v.mean()) for v in values]))
    interval = bootstrap_interval(values, lambda *s, axis: statistic([x.mean(axis) for x in s]), paired=True,
                                  seed=seed, undefined=undefined)
    out = {"value": point, "ci95": interval.as_list(), "n": n}
    if interval.reason:
        out["no_interval"] = interval.reason
    return out


def relative(condition, none):
    """(condition − none) / none × 100, the paper's relative change; NaN where ``none`` is 0 (arrays or tensors)."""
    if isinstance(condition, torch.Tensor):
        return torch.as_tensor(relative(condition.numpy(), none.numpy()))
    condition, none = np.asarray(condition, dtype=np.float64), np.asarray(none, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(none != 0, (condition - none) / np.where(none != 0, none, 1.0) * 100, np.nan)


def persona_effect(condition: torch.Tensor, none: torch.Tensor, seed: int = 0) -> dict:
    """Effect of a condition against no persona on one subcategory: relative (%) and absolute (points)."""
    rel = paired_bootstrap([condition, none], lambda m: relative(m[0], m[1]), seed=seed, undefined=ZERO_BASE)
    diff = paired_bootstrap([condition, none], lambda m: m[0] - m[1], seed=seed)
    out = {"relative": rel["value"], "relative_ci95": rel["ci95"], "absolute": diff["value"],
           "absolute_ci95": diff["ci95"], "n": rel["n"]}
    for key, found in (("relative_no_interval", rel), ("absolute_no_interval", diff)):
        if "no_interval" in found:
            out[key] = found["no_interval"]
    return out


def control_gain(matched: torch.Tensor, others: Sequence[torch.Tensor], none: torch.Tensor, seed: int = 0) -> dict:
    """Matched lift minus the mean lift of the non-matched personas (lift = relative change against no persona).

    The paper's "persona alignment score": above 0, the domain of the persona matters; near 0, any persona
    does as well. NaN without a non-matched persona.
    """
    if not others:
        return {"value": float("nan"), "ci95": None, "n": 0, "others": 0,
                "no_interval": "no non-matched persona"}

    def gain(m: list) -> np.ndarray:
        lifts = [relative(x, m[-1]) for x in m[:-1]]
        return lifts[0] - np.mean(np.stack(lifts[1:]), axis=0)

    return {**paired_bootstrap([matched, *others, none], gain, seed=seed, undefined=ZERO_BASE),
            "others": len(others)}


def mean_finite(values: Sequence[float]) -> float:
    """Mean of the finite values; NaN when there are none."""
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return sum(kept) / len(kept) if kept else float("nan")
