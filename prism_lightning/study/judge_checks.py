"""The study's judges on items whose right verdict is known, as `prism test` checks its own: without this a refusal
rate or an MT-Bench grade from a judge at chance would read as a persona effect."""

from __future__ import annotations

from typing import Any

from prism_lightning.contexts.personas import PersonaRegistry
from prism_lightning.evaluation.benchmarks import MT_BENCH_PERSONA
from prism_lightning.evaluation.judge_controls import (
    answer_items,
    cross_source_items,
    grade_control,
    refusal_control,
    refusal_items,
)
from prism_lightning.evaluation.judging import EvalJudge
from prism_lightning.evaluation.rows import MATCHED, Row
from prism_lightning.evaluation.suites import MT_JUDGE, REFUSAL
from prism_lightning.model.generation import DecodingConfig


def first_turn_answers(model: Any, questions: list[dict], registry: PersonaRegistry,
                       decoding: DecodingConfig) -> list[dict]:
    """Each MT-Bench question's first turn answered with no persona and with its category's matched persona."""
    matched = Row("matched", "base", MATCHED)
    plain = [model.prompt_ids(q["turns"][0]) for q in questions]
    expert = [model.prompt_ids(q["turns"][0], matched.persona_text(registry, MT_BENCH_PERSONA.get(q["category"])))
              for q in questions]
    base, persona = model.generate_ids(plain, decoding, "base"), model.generate_ids(expert, decoding, "base")
    return [{"query": q["turns"][0], "baseline_answer": b["text"], "persona_answer": p["text"]}
            for q, b, p in zip(questions, base, persona)]


def study_judge_controls(model: Any, data: dict, grader: EvalJudge, refusal: EvalJudge, registry: PersonaRegistry,
                         decoding: DecodingConfig, n: int, seed: int = 0) -> dict[str, dict]:
    """Refusal judge on known refusals and compliant replies to the safety prompts; grade judge on relevance,
    quality and both cross-source directions built from the no-persona and matched-persona first answers."""
    out: dict[str, dict] = {}
    if n <= 0:
        return out
    if "safety" in data:
        prompts = [p["prompt"] for rows in data["safety"].values() for p in rows]
        out["refusal"] = refusal_control(refusal, REFUSAL, refusal_items(prompts, n, seed))
    if "mt_bench" in data:
        answered = first_turn_answers(model, data["mt_bench"], registry, decoding)
        items = answer_items(answered, n, seed) + cross_source_items(answered, n // 2, seed)
        if items:
            out["grade"] = grade_control(grader, MT_JUDGE, items)
    return out
