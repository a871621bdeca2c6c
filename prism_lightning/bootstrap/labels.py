"""Turn judge scores into gate labels (distill = 1, retain = 0), judge statistics and control accuracies.

Every protocol decides the same kind of question, "is the candidate answer better than the baseline answer for
this query?", on three sets of comparisons: the corpus pairs (persona answer vs baseline answer), the relevance
controls (a query's own answer vs another query's answer) and the quality controls (a query's own answer vs a
degraded copy of it, ``degrade.py``). Scores are stored per record id: pairwise verdicts under the comparison's
id, per-answer scores (pointwise grades, likelihoods) under ``point/<answer key>`` and ``lik/<answer key>``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from prism_lightning.bootstrap.answers import BASELINE, sample_key
from prism_lightning.bootstrap.config import JudgeConfig
from prism_lightning.bootstrap.degrade import KINDS, degrade
from prism_lightning.bootstrap.reliability import label_reliability
from prism_lightning.bootstrap.protocols import (
    PairwiseDecision,
    decide_pairwise,
    decide_scores,
    expected_score,
    likelihood_score,
)
from prism_lightning.utils.stats import wilson_interval

PROTOCOLS = ("strict", "debiased", "pointwise", "likelihood", "pmi")
# What each protocol reads: the judge stage scores one of these kinds (likelihood and pmi share their scores).
SCORER = {"strict": "pairwise", "debiased": "pairwise", "pointwise": "pointwise", "likelihood": "likelihood",
          "pmi": "likelihood"}
_POINT_PREFIX = {"pointwise": "point", "likelihood": "lik"}


@dataclass(frozen=True)
class Comparison:
    """Candidate vs baseline answer to one query; ``*_key`` name the answers, ``id`` the pairwise record."""

    id: str
    question: str
    candidate_key: str
    baseline_key: str
    candidate: str = ""
    baseline: str = ""


def control_pairs(queries: list[dict], n: int, seed: int = 0) -> list[tuple[dict, dict]]:
    """Pairs (query, other query) for the judge check, the other taken from a different persona where possible."""
    rng = random.Random(seed)
    order = list(queries)
    rng.shuffle(order)
    chosen = order[:n]
    pairs = []
    for k, query in enumerate(chosen):
        others = [q for q in order[k + 1:] + order[:k] if q["persona"] != query["persona"]] or \
                 [q for q in order if q["id"] != query["id"]]
        if others:
            pairs.append((query, others[0]))
    return pairs


def answer_text(answers: Optional[dict], qid: str, name: str) -> str:
    """The stored answer of query ``qid`` under ``name`` (``""`` when only the keys are wanted)."""
    return answers[qid][name] if answers is not None else ""


def main_comparisons(queries: list[dict], candidates: dict[str, list[str]],
                     answers: Optional[dict] = None, samples: int = 1) -> list[Comparison]:
    """Each persona answer against the same query's baseline answer: sample i against sample i."""
    out = []
    for q in queries:
        for name in candidates[q["id"]]:
            for i in range(samples):
                mine, base = sample_key(name, i), sample_key(BASELINE, i)
                out.append(Comparison(f"{q['id']}/{mine}", q["query"], f"{q['id']}/{mine}", f"{q['id']}/{base}",
                                      answer_text(answers, q["id"], mine), answer_text(answers, q["id"], base)))
    return out


def relevance_comparisons(pairs: Sequence[tuple[dict, dict]], answers: Optional[dict] = None) -> list[Comparison]:
    """Each control query's own baseline answer against another query's (the judge must prefer its own)."""
    return [Comparison(f"control/{q['id']}/{o['id']}", q["query"], f"{q['id']}/{BASELINE}",
                       f"control/{q['id']}/{o['id']}", answer_text(answers, q["id"], BASELINE),
                       answer_text(answers, o["id"], BASELINE)) for q, o in pairs]


def quality_kind(index: int) -> str:
    """The degradation of the ``index``-th quality control: the kinds in turn."""
    return KINDS[index % len(KINDS)]


def quality_comparisons(pairs: Sequence[tuple[dict, dict]], answers: Optional[dict] = None) -> list[Comparison]:
    """Each control query's own baseline answer against a degraded copy of it (the other query donates a span)."""
    out = []
    for k, (q, o) in enumerate(pairs):
        own = answer_text(answers, q["id"], BASELINE)
        donor = answer_text(answers, o["id"], BASELINE)
        bad = degrade(own, quality_kind(k), donor, seed=k) if answers is not None else ""
        out.append(Comparison(f"quality/{q['id']}", q["query"], f"{q['id']}/{BASELINE}", f"quality/{q['id']}",
                              own, bad))
    return out


def scoring_items(kind: str, comparisons: Sequence[Comparison]) -> list[dict]:
    """What the judge scores for ``comparisons``: pairs (pairwise) or each distinct answer once (per-answer kinds)."""
    if kind == "pairwise":
        return [{"id": c.id, "question": c.question, "candidate": c.candidate, "baseline": c.baseline}
                for c in comparisons]
    items: dict[str, dict] = {}
    for c in comparisons:
        for key, text in ((c.candidate_key, c.candidate), (c.baseline_key, c.baseline)):
            items.setdefault(key, {"id": f"{_POINT_PREFIX[kind]}/{key}", "question": c.question, "answer": text})
    return list(items.values())


def _point_scores(records: list[dict], config: JudgeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    score, mass = expected_score(torch.tensor([r["grades"] for r in records]))
    return score, mass < config.min_choice_mass


def _likelihood_scores(records: list[dict], form: str) -> tuple[torch.Tensor, torch.Tensor]:
    cond, uncond, tokens = (torch.tensor([float(r[k]) for r in records], dtype=torch.float64)
                            for k in ("cond", "uncond", "tokens"))
    return likelihood_score(cond, uncond, tokens, form)


def decide(protocol: str, comparisons: Sequence[Comparison], scores: dict[str, dict],
           config: JudgeConfig) -> PairwiseDecision:
    """Every comparison decided under ``protocol`` from the stored scores."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"judge protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    kind = SCORER[protocol]
    if kind == "pairwise":
        first = torch.tensor([scores[c.id]["first"] for c in comparisons]).reshape(-1, 3)
        second = torch.tensor([scores[c.id]["second"] for c in comparisons]).reshape(-1, 3)
        return decide_pairwise(first, second, protocol, config.margin, config.min_choice_mass)
    prefix = _POINT_PREFIX[kind]
    sides = []
    for side in ("candidate_key", "baseline_key"):
        records = [scores[f"{prefix}/{getattr(c, side)}"] for c in comparisons]
        if not records:
            sides.append((torch.zeros(0), torch.zeros(0, dtype=torch.bool)))
        elif kind == "pointwise":
            sides.append(_point_scores(records, config))
        else:
            sides.append(_likelihood_scores(records, protocol))
    (cand, cand_bad), (base, base_bad) = sides
    return decide_scores(cand.double(), base.double(), cand_bad | base_bad, config.margin)


def label_queries(queries: list[dict], candidates: dict[str, list[str]], answers: dict[str, dict[str, str]],
                  scores: dict[str, dict], config: JudgeConfig, samples: int = 1) -> tuple[list[dict], dict]:
    """Label every query from its ``samples`` judged pairs per persona; return (corpus items, judge statistics).

    A persona's win probability is the share of its pairs it wins; the query's label is that of its best persona
    (highest win probability, then mean margin) and is 1 when the probability exceeds 0.5. At one sample this is
    the paper's single verdict. The persona and baseline answers kept for training are those of the pair that
    decided most clearly (largest margin for a distill item, smallest for a retain item); with several samples
    every pair is stored under ``samples``.
    """
    comparisons = main_comparisons(queries, candidates, samples=samples)
    d = decide(config.protocol, comparisons, scores, config)
    stats = judge_statistics(config.protocol, d)
    by_key = {c.id: (float(m), bool(lab)) for c, m, lab in zip(comparisons, d.margin.tolist(), d.label.tolist())}
    items, wins = [], []
    for query in queries:
        qid = query["id"]
        pairs = {name: [by_key[f"{qid}/{sample_key(name, i)}"] for i in range(samples)] for name in candidates[qid]}
        win_probs = {name: sum(lab for _, lab in p) / samples for name, p in pairs.items()}
        margins = {name: sum(m for m, _ in p) / samples for name, p in pairs.items()}
        best = max(candidates[qid], key=lambda n: (win_probs[n], margins[n]))
        label = win_probs[best] > 0.5
        pick = max if label else min
        chosen = pick(range(samples), key=lambda i: pairs[best][i][0])
        wins.append([sum(pairs[n][i][1] for n in pairs) / len(pairs) for i in range(samples)])
        item = {"id": qid, "persona": query["persona"], "query": query["query"], "label": int(label),
                "target_persona": best, "margin": round(margins[best], 4), "win_prob": round(win_probs[best], 4),
                "baseline_answer": answers[qid][sample_key(BASELINE, chosen)],
                "persona_answer": answers[qid][sample_key(best, chosen)], "label_source": config.protocol,
                **({"intent": query["intent"]} if "intent" in query else {})}
        if len(pairs) > 1:
            item["win_probs"] = {name: round(p, 4) for name, p in win_probs.items()}
        if samples > 1:
            item["sample"] = chosen
            item["samples"] = [{"baseline_answer": answers[qid][sample_key(BASELINE, i)],
                                "persona_answers": {n: answers[qid][sample_key(n, i)] for n in pairs},
                                "verdicts": {n: {"label": int(pairs[n][i][1]), "margin": round(pairs[n][i][0], 4)}
                                             for n in pairs}} for i in range(samples)]
        items.append(item)
    positive = sum(i["label"] for i in items) / len(items) if items else None
    stats["reliability"] = label_reliability(wins, positive)
    return items, stats


def judge_statistics(protocol: str, d: PairwiseDecision) -> dict:
    """Position bias, ties and unreadable verdicts over the corpus pairs (position and ties: pairwise only)."""
    n = len(d.label)
    if SCORER[protocol] != "pairwise":
        return {"position_bias_rate": None, "tie_rate": float((d.margin == 0).float().mean()) if n else 0.0,
                "unparseable": int(d.unparseable.sum())}
    return {"position_bias_rate": float(d.position_biased.float().mean()) if n else 0.0,
            "tie_rate": float(d.ties.float().mean() / 2) if n else 0.0,
            "unparseable": int(d.unparseable.sum()),
            "persona_wins_both_rate": float(d.candidate_wins_both.float().mean()) if n else 0.0}


def accuracy(correct: torch.Tensor, prefix: str = "control") -> dict:
    """Share correct with n and a 95 % Wilson interval, under ``<prefix>_accuracy``, ``_n`` and ``_ci95``."""
    k, n = int(correct.sum()), len(correct)
    if n == 0:
        return {f"{prefix}_accuracy": None, f"{prefix}_n": 0, f"{prefix}_ci95": [0.0, 1.0]}
    low, high = wilson_interval(k, n)
    return {f"{prefix}_accuracy": round(k / n, 4), f"{prefix}_n": n, f"{prefix}_ci95": [round(low, 4), round(high, 4)]}


def control_accuracy(pairs: list[tuple[dict, dict]], scores: dict[str, dict], config: JudgeConfig,
                     protocol: Optional[str] = None) -> dict:
    """Relevance control: share of pairs where the judge prefers a query's own answer to another query's."""
    if not pairs:
        return accuracy(torch.zeros(0, dtype=torch.bool))
    return accuracy(decide(protocol or config.protocol, relevance_comparisons(pairs), scores, config).label)


def quality_accuracy(pairs: list[tuple[dict, dict]], scores: dict[str, dict], config: JudgeConfig,
                     protocol: Optional[str] = None) -> dict:
    """Quality control: share of pairs where the judge prefers a query's own answer to its degraded copy, overall
    and per degradation kind."""
    if not pairs:
        return {**accuracy(torch.zeros(0, dtype=torch.bool), "quality"), "quality_by_kind": {}}
    correct = decide(protocol or config.protocol, quality_comparisons(pairs), scores, config).label
    kinds = [quality_kind(k) for k in range(len(pairs))]
    by_kind = {}
    for kind in KINDS:
        mine = correct[torch.tensor([k == kind for k in kinds])]
        if len(mine):
            by_kind[kind] = accuracy(mine, "quality")
    return {**accuracy(correct, "quality"), "quality_by_kind": by_kind}


def controls_verdict(stats: dict) -> str:
    """``reliable`` when both control intervals lie above chance, ``partial`` when one does, else ``noise``."""
    above = [stats.get(f"{kind}_n", 0) > 0 and stats[f"{kind}_ci95"][0] > 0.5 for kind in ("control", "quality")]
    return "reliable" if all(above) else "partial" if any(above) else "noise"
