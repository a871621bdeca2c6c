"""How much of a label is the query and how much is the draw: split-half reliability of the per-query win rate.

With ``data.labels.samples`` = m, each query's persona and baseline answers are sampled m times and judged pair by
pair; the label estimates the probability that the persona answer wins. The samples split into two halves (even
and odd draws); the correlation of the two halves' win rates across queries, Spearman–Brown corrected to the full
m, is the share of the label's variance that belongs to the query. A gate sees only the query, so that share bounds
what any gate can learn: ``auroc_ceiling`` turns it into the best held-out AUROC a gate could reach on these labels.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from scipy import stats

from prism_lightning.bootstrap.intent import sources_text
from prism_lightning.utils.stats import bootstrap_interval


def split_half(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-query means of the even and odd samples of ``scores`` [queries, m]."""
    return scores[:, 0::2].mean(axis=1), scores[:, 1::2].mean(axis=1)


def spearman_brown(r: np.ndarray | float) -> np.ndarray | float:
    """Reliability of the full estimate from the correlation of its two halves: 2r / (1 + r)."""
    return 2 * r / (1 + r)


def _half_reliability(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman–Brown corrected Pearson correlation of ``a`` and ``b`` along ``axis`` (NaN where a half is constant)."""
    a = a - a.mean(axis=axis, keepdims=True)
    b = b - b.mean(axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=axis) / np.sqrt((a * a).sum(axis=axis) * (b * b).sum(axis=axis))
        return spearman_brown(r)


def auroc_ceiling(reliability: float, positive_rate: float) -> float:
    """The held-out AUROC of a perfect gate on labels of this reliability, under a binormal model.

    The gate can at best know the query's expected score; its correlation with the observed score is
    sqrt(reliability). Thresholding the observed score at the positive rate turns that into a point-biserial
    correlation, then a standardised mean difference d, and AUROC = Φ(d / √2) (equal-variance binormal).
    """
    if not 0.0 < positive_rate < 1.0:
        return float("nan")
    if reliability <= 0:
        return 0.5
    if reliability >= 1:
        return 1.0
    r = math.sqrt(reliability)
    p = positive_rate
    r_pb = r * float(stats.norm.pdf(stats.norm.ppf(p))) / math.sqrt(p * (1 - p))
    d = r_pb / math.sqrt(p * (1 - p) * (1 - r_pb * r_pb))
    return float(stats.norm.cdf(d / math.sqrt(2)))


def label_reliability(scores: Sequence[Sequence[float]], positive_rate: Optional[float] = None) -> dict:
    """Split-half reliability of the per-query mean of ``scores`` [queries][m] (1 = the persona answer won).

    Returns the figure with its 95 % bootstrap interval over queries and the AUROC ceiling it implies (at the
    labels' positive rate), or ``None`` figures with the reason when they cannot be measured.
    """
    matrix = np.asarray(scores, dtype=np.float64)
    m = matrix.shape[1] if matrix.ndim == 2 else 0
    out: dict = {"samples": m, "queries": int(matrix.shape[0]) if matrix.ndim == 2 else 0, "reliability": None,
                 "reliability_ci95": None, "auroc_ceiling": None, "auroc_ceiling_ci95": None}
    if m < 2:
        out["reason"] = ("one sample per query (data.labels.samples = 1): a label's reliability cannot be measured; "
                         "raise data.labels.samples to 2 or more")
        return out
    a, b = split_half(matrix)
    value = float(_half_reliability(a, b))
    if not math.isfinite(value):
        out["reason"] = "one half of the samples gives every query the same win rate: no correlation to measure"
        return out
    out["reliability"] = round(value, 4)
    interval = bootstrap_interval([a, b], _half_reliability, paired=True,
                                  undefined="a half is constant (no correlation)")
    if interval.low is not None:
        out["reliability_ci95"] = [round(interval.low, 4), round(interval.high, 4)]
    else:
        out["reliability_reason"] = interval.reason
    rate = float((matrix.mean(axis=1) > 0.5).mean()) if positive_rate is None else positive_rate
    ceiling = auroc_ceiling(value, rate)
    if math.isfinite(ceiling):
        out["auroc_ceiling"] = round(ceiling, 4)
        if interval.low is not None:
            # The ceiling rises with the reliability, so the interval's ends map to the ceiling's.
            out["auroc_ceiling_ci95"] = [round(auroc_ceiling(interval.low, rate), 4),
                                         round(auroc_ceiling(interval.high, rate), 4)]
    return out


def reliability_text(rel: Optional[dict]) -> str:
    """One sentence on the labels' reliability and what it allows a gate, for summaries and the gate verdict."""
    if not rel:
        return "Labels' reliability: not recorded (a corpus built before data.labels.samples existed)."
    sources = sources_text(rel.get("label_sources"))
    if sources:
        return sources + " " + _measured_text(rel)
    return _measured_text(rel)


def _measured_text(rel: dict) -> str:
    if rel.get("reliability") is None:
        return f"Labels' reliability: not measured ({rel.get('reason', 'unknown reason')})."
    ci = rel.get("reliability_ci95")
    interval = f" (95% CI {ci[0]:.2f} to {ci[1]:.2f})" if ci else f" ({rel.get('reliability_reason', 'no interval')})"
    text = (f"Labels' split-half reliability {rel['reliability']:.2f}{interval}, {rel['samples']} samples per query, "
            f"n = {rel['queries']} queries")
    ceiling, cci = rel.get("auroc_ceiling"), rel.get("auroc_ceiling_ci95")
    if ceiling is None:
        return text + "."
    text += f"; the best AUROC any gate can reach on them is about {ceiling:.2f}"
    text += f" ({cci[0]:.2f}–{cci[1]:.2f}, binormal model)" if cci else " (binormal model)"
    low = ci[0] if ci else rel["reliability"]
    if low <= 0:
        return text + (": no gate can be shown to beat chance on them; raise data.labels.samples or use a stronger "
                       "judge (data.judge.model).")
    return text + "."

