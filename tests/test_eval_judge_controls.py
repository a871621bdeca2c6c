"""The evaluation judges' controls: items with known verdicts, accuracies with intervals, the chance mark, report."""

from __future__ import annotations

import math

import pytest
import torch

from prism_lightning.bootstrap.degrade import KINDS
from prism_lightning.bootstrap.judge import PAIRWISE_CHOICES
from prism_lightning.evaluation.judge_controls import (
    _summary,
    cross_source_items,
    COMPLIANT,
    REFUSALS,
    answer_items,
    grade_control,
    judge_line,
    preference_control,
    refusal_control,
    refusal_items,
)
from prism_lightning.evaluation.judging import Verdicts
from prism_lightning.evaluation.report import judge_cell, summary_lines, write_report
from prism_lightning.evaluation.suites import MT_JUDGE, REFUSAL
from prism_lightning.model.chat import ChatFormatter
from prism_lightning.model.choices import ChoiceReader

HELD_OUT = [{"id": f"q{k}", "query": f"Question {k}: how does part {k} work?", "label": k % 2,
             "baseline_answer": f"Part {k} works like this. It turns the wheel. Then the wheel moves the belt {k}."}
            for k in range(10)]


def test_refusal_items_pair_each_prompt_with_a_refusal_and_a_compliant_reply():
    items = refusal_items([f"harmful request {k}" for k in range(5)], 3, seed=1)
    assert len(items) == 6 and [i["refuses"] for i in items] == [True, False] * 3
    assert {i["response"] for i in items if i["refuses"]} <= set(REFUSALS)
    assert {i["response"] for i in items if not i["refuses"]} <= set(COMPLIANT)
    assert items[0]["prompt"] == items[1]["prompt"] and refusal_items(["p"], 3)[0]["prompt"] == "p"


def test_answer_items_alternate_relevance_and_each_degradation():
    items = answer_items(HELD_OUT, 8, seed=0)
    assert [i["kind"] for i in items] == ["relevance", KINDS[0], "relevance", KINDS[1], "relevance", KINDS[2],
                                          "relevance", KINDS[0]]
    texts = {h["query"]: h["baseline_answer"] for h in HELD_OUT}
    for item in items:
        assert item["good"] == texts[item["question"]] and item["worse"] != item["good"]
        if item["kind"] == "relevance":
            assert item["worse"] in texts.values()
    assert answer_items(HELD_OUT[:1], 8) == []


class KeywordJudge:
    """A stand-in for the model: Yes when the response reads as a refusal (or always ``fixed``)."""

    def __init__(self, fixed=None, unreadable_every: int = 0) -> None:
        self.fixed, self.unreadable_every = fixed, unreadable_every

    def yes_probability(self, prompts):
        values = torch.tensor([self.fixed if self.fixed is not None else
                               (0.9 if any(r in p for r in REFUSALS) else 0.1) for p in prompts], dtype=torch.float)
        readable = torch.tensor([not self.unreadable_every or k % self.unreadable_every for k in range(len(prompts))])
        return Verdicts(values, torch.ones(len(prompts)), readable.bool())

    def grade(self, prompts):
        # The worse answers are shorter (cut) or carry foreign words; a longer own answer grades higher here.
        values = torch.tensor([float(len(p)) / 100 for p in prompts])
        return Verdicts(values, torch.ones(len(prompts)), torch.ones(len(prompts), dtype=torch.bool))


def test_refusal_control_separates_a_judge_that_reads_from_one_that_always_says_yes():
    items = refusal_items([f"request {k}" for k in range(20)], 20)
    reading = refusal_control(KeywordJudge(), REFUSAL, items)
    assert reading["control_accuracy"] == 1.0 and reading["control_n"] == 40 and not reading["at_chance"]
    always = refusal_control(KeywordJudge(fixed=0.9), REFUSAL, items)
    assert always["control_accuracy"] == 0.5 and always["at_chance"]
    assert always["refusals_called_refusals"]["control_accuracy"] == 1.0
    assert always["compliance_called_compliance"]["control_accuracy"] == 0.0
    skipped = refusal_control(KeywordJudge(unreadable_every=4), REFUSAL, items)
    assert skipped["unreadable"] == 10 and skipped["control_n"] == 30


def test_grade_control_counts_strictly_higher_grades_per_kind():
    items = [{"question": "q", "good": "a long and complete answer", "worse": "short", "kind": "cut"},
             {"question": "q", "good": "short", "worse": "a much longer but off-topic answer", "kind": "relevance"}]
    result = grade_control(KeywordJudge(), MT_JUDGE, items)
    assert result["control_accuracy"] == 0.5 and result["control_n"] == 2 and result["at_chance"]
    assert result["by_kind"]["cut"]["control_accuracy"] == 1.0
    assert result["by_kind"]["relevance"]["control_accuracy"] == 0.0


def test_preference_control_reads_both_orders(smol_tokenizer):
    formatter = ChatFormatter(smol_tokenizer)
    reader = ChoiceReader(smol_tokenizer, PAIRWISE_CHOICES)
    a_id, b_id = reader.sequences[0][0], reader.sequences[1][0]

    def logprobs(prompts, columns, tail):
        """Prefers the slot holding the text "GOOD" (a content judge, whichever order)."""
        out = torch.full((len(prompts), tail, len(columns)), -8.0)
        for k, ids in enumerate(prompts):
            text = smol_tokenizer.decode(ids)
            good_in_a = text.index("GOOD") < text.index("[Answer B]")
            out[k, :, columns.index(a_id if good_in_a else b_id)] = -0.05
        return out

    items = [{"question": f"q{k}", "good": "GOOD answer", "worse": "bad answer", "kind": "relevance"}
             for k in range(12)]
    result = preference_control(logprobs, formatter, items)
    assert result["control_accuracy"] == 1.0 and result["control_n"] == 12 and not result["at_chance"]

    def position_a(prompts, columns, tail):
        out = torch.full((len(prompts), tail, len(columns)), -8.0)
        out[:, :, columns.index(a_id)] = -0.05
        return out

    biased = preference_control(position_a, formatter, items)
    assert biased["control_accuracy"] == 0.0 and biased["at_chance"]  # debiased: position alone decides nothing


def _metrics(controls: dict) -> dict:
    rows = {"Base": {"scores": {"MT-Bench/writing": 40.0, "Safety/HarmBench": 20.0, "MMLU/STEM": 30.0},
                     "overall": 30.0, "intervals": {}}}
    return {"model": "m", "subcategories": ["MT-Bench/writing", "MMLU/STEM", "Safety/HarmBench"], "rows": rows,
            "counts": {"MT-Bench/writing": 2, "MMLU/STEM": 4, "Safety/HarmBench": 2}, "judge_controls": controls}


def test_report_marks_scores_from_a_judge_at_chance(tmp_path):
    # The chance mark is computed from the verdicts (11 of 20 right: interval reaches 50 %; 38 of 40: it does not),
    # never taken from the input.
    grade = _summary(torch.tensor([True] * 11 + [False] * 9), unreadable=0)
    refusal = _summary(torch.tensor([True] * 38 + [False] * 2), unreadable=0)
    assert grade["at_chance"] and not refusal["at_chance"]
    # the boundary: 15 of 20 (Wilson 53-89 %) is above chance, 14 of 20 (48-85 %) is not
    assert not _summary(torch.tensor([True] * 15 + [False] * 5), unreadable=0)["at_chance"]
    assert _summary(torch.tensor([True] * 14 + [False] * 6), unreadable=0)["at_chance"]
    controls = {"grade": grade, "refusal": refusal}
    metrics = _metrics(controls)
    assert judge_cell(controls, "MT-Bench/writing") == "55% (34%–74%) AT CHANCE"
    assert judge_cell(controls, "Safety/HarmBench") == "95% (84%–99%)" and judge_cell(controls, "MMLU/STEM") == "–"
    lines = summary_lines(metrics)
    assert any(line.startswith("Grade judge control accuracy 55%") and "AT CHANCE" in line for line in lines)
    assert any(line.startswith("Refusal judge control accuracy 95%") and "Above chance" in line for line in lines)
    report = write_report(metrics, tmp_path).read_text()
    assert "| judge control accuracy | 55% (34%–74%) AT CHANCE | – | 95% (84%–99%) | |" in report
    assert "not a reading" in report
    assert "no control items" in judge_line("Grade", {"control_n": 0})
    assert not math.isnan(controls["grade"]["control_accuracy"])


def test_a_benchmark_run_schedules_judge_controls_only_when_a_judge_is_used():
    from prism_lightning.contexts.personas import PersonaConfig, PersonaRegistry
    from prism_lightning.evaluation.benchmark import BenchmarkConfig, BenchmarkRun

    registry = PersonaRegistry.from_config(PersonaConfig())
    mmlu_only = BenchmarkRun(BenchmarkConfig(mmlu_n=4), registry, HELD_OUT, {})
    assert "judge_controls" not in [u["suite"] for u in mmlu_only.units()]
    with_pref = BenchmarkRun(BenchmarkConfig(mmlu_n=4, preference_n=2), registry, HELD_OUT, {})
    assert [u["suite"] for u in with_pref.units()][-1] == "judge_controls"
    off = BenchmarkRun(BenchmarkConfig(mmlu_n=4, preference_n=2, judge_controls=0), registry, HELD_OUT, {})
    assert "judge_controls" not in [u["suite"] for u in off.units()]


@pytest.mark.parametrize("n", [0, 1])
def test_refusal_items_handle_few_prompts(n):
    assert len(refusal_items(["p"] * n, 5)) == 2 * n


def test_cross_source_items_degrade_each_source_and_a_one_source_judge_is_flagged():
    held = [{"query": f"q{k}", "baseline_answer": f"Plain answer number {k}. It is short. It is fine.",
             "persona_answer": f"Expert answer number {k}. It explains. It checks the edge cases."} for k in range(12)]
    items = cross_source_items(held, 10, seed=0)
    assert [i["kind"] for i in items[:2]] == ["cross_persona", "cross_baseline"] and len(items) == 20
    assert all(i["good"].startswith("Expert" if i["kind"] == "cross_persona" else "Plain") for i in items)
    assert all(i["worse"] != i["good"] for i in items)
    kinds = [i["kind"] for i in items]
    # A judge that always prefers the baseline source: right on every cross_baseline item, wrong on the others.
    biased = _summary(torch.tensor([k == "cross_baseline" for k in kinds]), unreadable=0, kinds=kinds)
    assert biased["control_n"] == 0  # cross items never enter the relevance/quality accuracy
    assert biased["cross_source"]["source_bias"] == "baseline"
    fair = _summary(torch.ones(len(kinds), dtype=torch.bool), unreadable=0, kinds=kinds)
    assert fair["cross_source"]["source_bias"] is None
    assert "biased toward the baseline answers" in judge_line("Grade", {**biased, "control_n": 4,
                                                                          "control_accuracy": 1.0,
                                                                          "control_ci95": [0.5, 1.0]})
