"""Cross-source judge controls: does a protocol prefer one *source* of answers whatever their quality?

The relevance and quality controls pit a baseline answer against a worse baseline answer: they never show the
judge a persona answer, so they cannot see a protocol that prefers the model's own no-persona phrasing (the
``likelihood`` protocol scores answers by the model's own likelihood, which favours exactly that). Here the judge
sees, for each control query, the intact persona answer against a degraded baseline answer, and the intact baseline
answer against a degraded persona answer (the quality control's degradations, in turn). An unbiased judge prefers
the intact answer about equally often in both directions; a protocol whose two accuracies differ beyond their
Wilson intervals leans toward one source, and is never chosen to label a corpus.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from prism_lightning.bootstrap.answers import BASELINE
from prism_lightning.bootstrap.config import JudgeConfig
from prism_lightning.bootstrap.degrade import degrade
from prism_lightning.bootstrap.labels import (
    Comparison,
    accuracy,
    answer_text,
    decide,
    main_comparisons,
    quality_kind,
)

VERSION = 1  # part of the judge stage's hash: a change here rescores


def cross_comparisons(pairs: Sequence[tuple[dict, dict]], candidates: dict[str, list[str]],
                      answers: Optional[dict] = None) -> list[Comparison]:
    """Per control pair: intact persona vs degraded baseline, then intact baseline vs degraded persona.

    The degraded baseline is the quality control's own (same key, so per-answer scores are reused); the degraded
    persona answer takes its splice donor from the other query's persona answer (the same source).
    """
    out = []
    for k, (q, o) in enumerate(pairs):
        persona, donor_persona = candidates[q["id"]][0], candidates[o["id"]][0]
        kind = quality_kind(k)
        base, own = answer_text(answers, q["id"], BASELINE), answer_text(answers, q["id"], persona)
        donors = answer_text(answers, o["id"], BASELINE), answer_text(answers, o["id"], donor_persona)
        bad_base = degrade(base, kind, donors[0], seed=k) if answers is not None else ""
        bad_own = degrade(own, kind, donors[1], seed=k) if answers is not None else ""
        out.append(Comparison(f"cross_persona/{q['id']}", q["query"], f"{q['id']}/{persona}", f"quality/{q['id']}",
                              own, bad_base))
        out.append(Comparison(f"cross_baseline/{q['id']}", q["query"], f"{q['id']}/{BASELINE}",
                              f"cross_bad/{q['id']}/{persona}", base, bad_own))
    return out


def source_bias(directions: dict) -> Optional[str]:
    """``baseline`` or ``persona`` when the two directions' Wilson intervals do not overlap, else None."""
    if not directions.get("cross_persona_n") or not directions.get("cross_baseline_n"):
        return None
    persona, baseline = directions["cross_persona_ci95"], directions["cross_baseline_ci95"]
    if persona[1] < baseline[0]:
        return "baseline"
    if baseline[1] < persona[0]:
        return "persona"
    return None


def cross_source_accuracy(pairs: Sequence[tuple[dict, dict]], candidates: dict[str, list[str]],
                          queries: Sequence[dict], scores: dict[str, dict], config: JudgeConfig,
                          protocol: Optional[str] = None, samples: int = 1) -> dict:
    """Both directions' accuracies (Wilson intervals), the protocol's share of corpus pairs (every sample's) that
    prefer the baseline answer, and ``source_bias`` (None, ``baseline`` or ``persona``)."""
    protocol = protocol or config.protocol
    comparisons = cross_comparisons(pairs, candidates)
    if comparisons:
        correct = decide(protocol, comparisons, scores, config).label
    else:
        correct = torch.zeros(0, dtype=torch.bool)
    out = {**accuracy(correct[0::2], "cross_persona"), **accuracy(correct[1::2], "cross_baseline")}
    main = main_comparisons(list(queries), candidates, samples=samples)
    margins = decide(protocol, main, scores, config).margin if main else torch.zeros(0)
    out["prefers_baseline"] = round(float((margins < 0).double().mean()), 4) if len(margins) else None
    out["source_bias"] = source_bias(out)
    return out


def bias_note(row: dict) -> str:
    """One phrase for a table or a summary: the two directions and what they say."""
    def cell(prefix: str) -> str:
        acc, (low, high) = row.get(f"{prefix}_accuracy"), row.get(f"{prefix}_ci95", [0.0, 1.0])
        return "–" if acc is None else f"{acc:.0%} ({100 * low:.0f}–{100 * high:.0f})"
    lean = row.get("source_bias")
    verdict = f"biased toward the {lean} answers" if lean else "no source bias beyond the intervals"
    return (f"intact persona > degraded baseline {cell('cross_persona')}, intact baseline > degraded persona "
            f"{cell('cross_baseline')}: {verdict}")
