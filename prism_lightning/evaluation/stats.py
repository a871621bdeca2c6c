"""Pure statistics of the benchmark: bootstrap intervals of means and macro averages, the preference tally."""

from __future__ import annotations

import math
import random
from typing import Optional, Sequence, Union

import torch

from prism_lightning.utils import stats

# Per-pair preference outcomes, PRISM's point of view; a tie is half a win wherever a single rate is asked for.
WIN, TIE, LOSS = 1.0, 0.5, 0.0


def bootstrap_interval(groups: Union[torch.Tensor, Sequence[torch.Tensor]], samples: int = 1000,
                       seed: int = 0) -> list[float]:
    """95 % bootstrap interval (scipy; BCa where defined) of the mean of group means, items resampled within each
    group.

    One tensor is one group (the interval of a plain mean: MMLU, MT-Bench, safety, preference); several groups
    give the interval of a macro average (Overall: items resampled within each subcategory, so every
    resample keeps each subcategory's size and weight). NaN (printed as no interval) when there is no group, a
    group has fewer than 5 items, or every resample gives the same value.
    """
    groups = [groups] if isinstance(groups, torch.Tensor) else list(groups)
    if not groups:
        return [float("nan"), float("nan")]
    interval = stats.bootstrap_interval([g.double().numpy() for g in groups],
                                        lambda *gs, axis: sum(g.mean(axis) for g in gs) / len(gs), paired=False,
                                        seed=seed, resamples=samples)
    return interval.as_list() or [float("nan"), float("nan")]


def preference_outcomes(margins: torch.Tensor, identical: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """WIN / TIE / LOSS per pair: a debiased margin above ``margin`` wins, below ``-margin`` loses, else a tie.

    Identical texts are ties whatever the judge's float noise says: there is nothing to prefer.
    """
    out = torch.full(margins.shape, TIE, dtype=torch.float64)
    out[margins > margin] = WIN
    out[margins < -margin] = LOSS
    out[identical.bool()] = TIE
    return out


def preference_summary(outcomes: torch.Tensor, seed: int = 0) -> dict:
    """Wins, losses, ties; the headline win rate with ties counted half, and the rate over decided pairs.

    Ties counted half is the headline: it uses every pair and reads 50 % for a system that never differs from
    Base, where the decided-only rate is undefined (PRISM equals Base on every prompt its gate keeps closed).
    """
    wins, losses = int((outcomes == WIN).sum()), int((outcomes == LOSS).sum())
    ties = len(outcomes) - wins - losses
    decided = outcomes[outcomes != TIE]
    return {"n": len(outcomes), "wins": wins, "losses": losses, "ties": ties,
            "win_rate": 100 * float(outcomes.mean()) if len(outcomes) else float("nan"),
            "ci95": [100 * v for v in bootstrap_interval(outcomes, seed=seed)],
            "win_rate_decided": 100 * wins / len(decided) if len(decided) else float("nan"),
            "ci95_decided": [100 * v for v in bootstrap_interval(decided, seed=seed)],
            "headline": "win_rate (ties counted half)"}


def stratified_items(items: list[dict], n: Optional[int], key: str, seed: int = 0) -> list[dict]:
    """``n`` items with every ``key`` value in proportion (largest remainder, at least one each when n allows)."""
    if n is None or n >= len(items):
        return list(items)
    groups: dict = {}
    for item in items:
        groups.setdefault(item[key], []).append(item)
    names = sorted(groups, key=str)
    quota = {g: n * len(groups[g]) / len(items) for g in names}
    floor = 1 if n >= len(names) else 0
    share = {g: min(len(groups[g]), max(floor, math.floor(quota[g]))) for g in names}
    while sum(share.values()) < n:  # the largest shortfall against its quota first (largest remainder)
        share[max((g for g in names if share[g] < len(groups[g])), key=lambda g: quota[g] - share[g])] += 1
    while sum(share.values()) > n:  # the floors of one overshot: the share furthest above its quota gives back
        share[max((g for g in names if share[g] > floor), key=lambda g: share[g] - quota[g])] -= 1
    rng = random.Random(seed)
    picked = [item for g in names for item in rng.sample(groups[g], share[g])]
    rng.shuffle(picked)
    return picked
