"""The ``intent`` protocol: labels from what a query asks for, not from a verdict on two sampled answers.

Stage 1 writes, beside the persona-domain queries, questions the persona (or context) does not help with: knowledge
questions for a persona, general questions for a context (``intent: outside``). Those are retain by construction.
The persona-domain queries (``intent: inside``) take the label of ``data.judge.intent_scorer``, or are distill by
construction when it is ``none``. Every item records ``label_source``: ``construction`` or the scoring protocol.
"""

from __future__ import annotations

from typing import Optional

from prism_lightning.bootstrap.answers import BASELINE
from prism_lightning.bootstrap.config import JudgeConfig

CONSTRUCTION = "construction"


def constructed_label(query: dict, config: JudgeConfig) -> Optional[int]:
    """The label a query gets by construction under ``config`` (0 outside, 1 inside without a scorer), else None."""
    if config.protocol != "intent":
        return None
    if query.get("intent") == "outside":
        return 0
    return 1 if config.scoring is None else None


def split_by_source(queries: list[dict], config: JudgeConfig) -> tuple[list[dict], list[dict]]:
    """(queries a judge labels, queries labelled by construction), each in input order."""
    judged, built = [], []
    for query in queries:
        (judged if constructed_label(query, config) is None else built).append(query)
    return judged, built


def construction_item(query: dict, answers: dict[str, dict[str, str]], config: JudgeConfig) -> dict:
    """The corpus item of a query labelled by construction: its own persona's answer and the baseline's (sample 0).

    The win probability equals the label (soft targets = hard ones): nothing was measured about this query.
    """
    label = constructed_label(query, config)
    own = answers[query["id"]]
    return {"id": query["id"], "persona": query["persona"], "query": query["query"], "label": label,
            "target_persona": query["persona"], "margin": None, "win_prob": float(label),
            "baseline_answer": own[BASELINE], "persona_answer": own[query["persona"]],
            "label_source": CONSTRUCTION, **({"intent": query["intent"]} if "intent" in query else {})}


def source_counts(items: list[dict]) -> dict[str, dict[str, int]]:
    """Per label source: how many items, and of them distill and retain."""
    out: dict[str, dict[str, int]] = {}
    for item in items:
        row = out.setdefault(item.get("label_source", "judge"), {"items": 0, "distill": 0, "retain": 0})
        row["items"] += 1
        row["distill" if item["label"] == 1 else "retain"] += 1
    return out


def sources_text(sources: Optional[dict]) -> str:
    """Plain words on which labels are a prior (construction) and which were measured, for summaries and verdicts."""
    if not sources or set(sources) == {"judge"}:
        return ""
    parts = []
    built = sources.get(CONSTRUCTION)
    if built:
        parts.append(f"{built['items']} by construction ({built['retain']} questions the persona does not help "
                     f"with -> retain, {built['distill']} persona-domain queries -> distill): a prior from what each "
                     f"query asks for, not a measurement")
    for source, row in sources.items():
        if source != CONSTRUCTION:
            parts.append(f"{row['items']} measured by the {source} protocol ({row['distill']} distill, "
                         f"{row['retain']} retain)")
    return "Labels: " + "; ".join(parts) + "."
