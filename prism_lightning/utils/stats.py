"""Intervals from scipy, shared by every layer that reports one: Wilson for a proportion, the bootstrap (BCa where
it is defined, percentile otherwise) for a statistic of items. An interval that cannot be computed is not made up:
it comes back as ``None`` with the reason, for the report to print instead."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
from scipy import stats

# Below this many items a bootstrap interval says more about the resampler than about the data.
MIN_ITEMS = 5
RESAMPLES = 1000


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion (95 % at the default ``z``); (0, 1) when there is nothing to count."""
    if n == 0:
        return (0.0, 1.0)
    level = 2 * float(stats.norm.cdf(z)) - 1
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return (float(ci.low), float(ci.high))


@dataclass(frozen=True)
class Interval:
    """A 95 % interval, or why there is none (``low``/``high`` None and ``reason`` set)."""

    low: Optional[float]
    high: Optional[float]
    method: Optional[str] = None
    reason: Optional[str] = None

    def as_list(self) -> Optional[list[float]]:
        """``[low, high]``, or None when there is no interval."""
        return None if self.low is None else [self.low, self.high]


def bootstrap_interval(samples: Sequence[Sequence[float]], statistic: Callable[..., np.ndarray], *,
                       paired: bool, seed: int = 0, resamples: int = RESAMPLES, min_items: int = MIN_ITEMS,
                       undefined: str = "the statistic is undefined") -> Interval:
    """95 % bootstrap interval of ``statistic(*samples, axis=-1)`` (``scipy.stats.bootstrap``).

    ``paired``: the samples score the same items in the same order and are resampled together (conditions of a
    study); otherwise each is resampled on its own (the groups of a macro average). BCa where it is defined, else
    the percentile interval of the same resamples. None, with the reason, when a sample has fewer than
    ``min_items`` items or the statistic is undefined (NaN) in any resample: an interval of the surviving draws would
    describe another population.
    """
    arrays = [np.asarray(s, dtype=np.float64) for s in samples]
    smallest = min((len(a) for a in arrays), default=0)
    if smallest < min_items:
        return Interval(None, None, reason=f"n < {min_items}, no interval")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BCa on degenerate data warns and gives NaN: handled below
        result = stats.bootstrap(arrays, statistic, paired=paired, vectorized=True, n_resamples=resamples,
                                 confidence_level=0.95, method="BCa", random_state=np.random.default_rng(seed))
    draws = np.asarray(result.bootstrap_distribution)
    undefined_share = float(np.mean(~np.isfinite(draws)))
    if undefined_share > 0:
        return Interval(None, None, reason=f"{undefined} in {100 * undefined_share:.0f} % of resamples")
    if float(np.ptp(draws)) <= 1e-9 * max(1.0, float(np.max(np.abs(draws)))):  # equal up to rounding
        return Interval(None, None, reason="every resample gives the same value, no interval")
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    if np.isfinite(low) and np.isfinite(high):
        return Interval(low, high, method="BCa")
    low, high = np.percentile(draws, [2.5, 97.5])
    return Interval(float(low), float(high), method="percentile")
