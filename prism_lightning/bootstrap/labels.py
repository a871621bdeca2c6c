"""Turn judge scores into gate labels (distill = 1, retain = 0), judge statistics and control accuracy."""

from __future__ import annotations

import random
from typing import Optional

import torch

from prism_lightning.bootstrap.answers import BASELINE
from prism_lightning.bootstrap.config import JudgeConfig
from prism_lightning.bootstrap.protocols import decide_pairwise, expected_score, wilson_interval


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


def _pairwise(records: list[Optional[dict]], config: JudgeConfig):
    first = torch.tensor([r["first"] for r in records])
    second = torch.tensor([r["second"] for r in records])
    return decide_pairwise(first, second, config.protocol, config.margin, config.min_choice_mass)


def _points(records: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    return expected_score(torch.tensor([r["grades"] for r in records]))


def label_queries(queries: list[dict], candidates: dict[str, list[str]], answers: dict[str, dict[str, str]],
                  scores: dict[str, dict], config: JudgeConfig) -> tuple[list[dict], dict]:
    """Label every query and return (corpus items, judge statistics over the main pairs)."""
    keys = [(q["id"], name) for q in queries for name in candidates[q["id"]]]
    if config.protocol == "pointwise":
        cand, cand_mass = _points([scores[f"point/{qid}/{name}"] for qid, name in keys])
        base, base_mass = _points([scores[f"point/{qid}/{BASELINE}"] for qid, _ in keys])
        margins = cand - base
        unparseable = torch.minimum(cand_mass, base_mass) < config.min_choice_mass
        labels = (margins > config.margin) & ~unparseable
        stats = {"position_bias_rate": None, "tie_rate": float((margins == 0).float().mean()) if keys else 0.0,
                 "unparseable": int(unparseable.sum())}
    else:
        d = _pairwise([scores[f"{qid}/{name}"] for qid, name in keys], config)
        margins, labels, unparseable = d.margin, d.label, d.unparseable
        stats = {"position_bias_rate": float(d.position_biased.float().mean()) if keys else 0.0,
                 "tie_rate": float(d.ties.float().mean() / 2) if keys else 0.0,
                 "unparseable": int(unparseable.sum()),
                 "persona_wins_both_rate": float(d.candidate_wins_both.float().mean()) if keys else 0.0}
    by_key = {key: (float(m), bool(lab)) for key, m, lab in zip(keys, margins.tolist(), labels.tolist())}
    items = []
    for query in queries:
        options = [(by_key[(query["id"], n)], n) for n in candidates[query["id"]]]
        (margin, label), best = max(options, key=lambda o: (o[0][1], o[0][0]))
        items.append({"id": query["id"], "persona": query["persona"], "query": query["query"],
                      "label": int(label), "target_persona": best, "margin": round(margin, 4),
                      "baseline_answer": answers[query["id"]][BASELINE],
                      "persona_answer": answers[query["id"]][best]})
    return items, stats


def control_accuracy(pairs: list[tuple[dict, dict]], scores: dict[str, dict], config: JudgeConfig) -> dict:
    """Share of control pairs where the judge prefers a query's own answer, with n and a 95 % Wilson interval."""
    if not pairs:
        return {"control_accuracy": None, "control_n": 0, "control_ci95": [0.0, 1.0]}
    if config.protocol == "pointwise":
        own, _ = _points([scores[f"point/{q['id']}/{BASELINE}"] for q, _ in pairs])
        other, _ = _points([scores[f"point/control/{q['id']}/{o['id']}"] for q, o in pairs])
        correct = own - other > config.margin
    else:
        correct = _pairwise([scores[f"control/{q['id']}/{o['id']}"] for q, o in pairs], config).label
    k, n = int(correct.sum()), len(pairs)
    low, high = wilson_interval(k, n)
    return {"control_accuracy": round(k / n, 4), "control_n": n, "control_ci95": [round(low, 4), round(high, 4)]}
