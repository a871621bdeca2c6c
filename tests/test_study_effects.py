"""`prism study`'s derived quantities on constructed inputs, its cell enumeration, and its analysis."""

from __future__ import annotations

import json
import math

import pytest
import torch

from prism_lightning.model.chat import ChatFormatter
from prism_lightning.study.analysis import analyse, group_members
from prism_lightning.study.report import summary_lines
from prism_lightning.study.cells import Cell, Condition, cells, conditions, matched_persona
from prism_lightning.study.config import StudyConfig
from prism_lightning.study.effects import control_gain, paired_bootstrap, persona_effect, relative
from prism_lightning.utils.errors import PrismError

NAN = float("nan")


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# --------------------------------------------------------------------------- effects
def test_relative_effect_is_the_papers_relative_change_and_undefined_at_zero():
    assert relative(t(60.0), t(50.0)).item() == pytest.approx(20.0)
    assert relative(t(40.0), t(50.0)).item() == pytest.approx(-20.0)
    assert math.isnan(relative(t(10.0), t(0.0)).item())


def test_persona_effect_compares_only_the_items_both_conditions_scored():
    none = t(50.0, 50.0, 100.0, NAN)
    condition = t(100.0, 50.0, NAN, 0.0)  # item 3 unreadable under the persona, item 4 without it
    effect = persona_effect(condition, none, seed=0)
    assert effect["n"] == 2
    assert effect["absolute"] == pytest.approx(25.0)  # (100 + 50) / 2 - 50
    assert effect["relative"] == pytest.approx(50.0)
    # Two items: no interval (it would describe the resampler), and the effect says so.
    assert effect["relative_ci95"] is None and effect["relative_no_interval"] == "n < 5, no interval"


def test_an_interval_holds_the_effect_at_n_of_five_or_more():
    g = torch.Generator().manual_seed(0)
    none = (torch.rand(40, generator=g, dtype=torch.float64) < 0.5).double() * 100
    condition = (torch.rand(40, generator=g, dtype=torch.float64) < 0.7).double() * 100
    effect = persona_effect(condition, none, seed=0)
    low, high = effect["absolute_ci95"]
    assert low < effect["absolute"] < high and high - low > 5


def test_a_relative_effect_undefined_in_some_resamples_gets_no_interval_and_says_why():
    """Dropping the resamples whose no-persona mean is 0 (as before) would describe another population."""
    none = t(0, 0, 0, 0, 0, 0, 0, 0, 0, 100.0)  # one item in ten scored without the persona
    condition = t(100.0, 0, 100.0, 0, 100.0, 0, 100.0, 0, 0, 100.0)
    effect = persona_effect(condition, none, seed=0)
    assert effect["relative"] == pytest.approx(400.0)
    assert effect["relative_ci95"] is None
    share = float(effect["relative_no_interval"].split(" in ")[1].split(" %")[0])
    assert effect["relative_no_interval"].startswith("no-persona score is 0 in ") and 20 < share < 50  # 0.9^10 = 35 %
    assert effect["absolute_ci95"] is not None  # the absolute change is defined in every resample


def test_a_difference_without_spread_gets_no_zero_width_interval():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(200, generator=g, dtype=torch.float64) * 100
    shifted = base + 5.0  # the same items, each 5 points higher: the difference has no spread at all
    effect = persona_effect(shifted, base, seed=1)
    assert effect["absolute"] == pytest.approx(5.0)
    assert effect["absolute_ci95"] is None and "same value" in effect["absolute_no_interval"]
    noisy = base + 5.0 + torch.randn(200, generator=g, dtype=torch.float64)
    low, high = persona_effect(noisy, base, seed=1)["absolute_ci95"]
    assert 4.5 < low < 5.0 < high < 5.5  # paired: the spread of the differences, not of the scores


def test_paired_bootstrap_is_seeded_and_nan_without_items():
    g = torch.Generator().manual_seed(2)
    a, b = (torch.rand(12, generator=g) < 0.7).double(), (torch.rand(12, generator=g) < 0.4).double()
    first = paired_bootstrap([a, b], lambda m: m[0] - m[1], seed=3)
    assert first == paired_bootstrap([a, b], lambda m: m[0] - m[1], seed=3)
    assert first["value"] == pytest.approx(float(a.mean() - b.mean())) and first["n"] == 12
    assert first["ci95"][0] < first["value"] < first["ci95"][1]
    empty = paired_bootstrap([t(NAN), t(1.0)], lambda m: m[0] - m[1])
    assert empty["n"] == 0 and math.isnan(empty["value"]) and empty["ci95"] is None


def test_control_gain_is_matched_lift_minus_the_mean_non_matched_lift():
    none = t(50.0, 50.0, 50.0, 50.0, 50.0)
    matched = t(75.0, 75.0, 75.0, 75.0, 75.0)  # +50 %
    others = [t(*[55.0] * 5), t(*[45.0] * 5), t(*[60.0] * 5)]  # +10 %, -10 %, +20 %: mean +6.67 %
    gain = control_gain(matched, others, none)
    assert gain["value"] == pytest.approx(50.0 - 20.0 / 3)
    assert gain["ci95"] is None and "same value" in gain["no_interval"]  # no spread across items
    assert gain["others"] == 3 and gain["n"] == 5
    assert math.isnan(control_gain(matched, [], none)["value"])


# --------------------------------------------------------------------------- cells
def test_cells_cover_no_persona_matched_lengths_placements_and_controls(smol_tokenizer):
    found = conditions(StudyConfig(), ChatFormatter(smol_tokenizer), ["math", "writing"])
    assert [c.name for c in found] == [
        "none", "matched/min/system", "matched/min/user", "matched/half/system", "matched/half/user",
        "matched/full/system", "matched/full/user", "math/full/system", "writing/full/system"]
    grid = cells(found, ["mmlu", "safety"])
    assert len(grid) == 18 and grid[0] == Cell(found[0], "mmlu") and grid[-1].key == "safety|writing/full/system"
    assert found[1].row().persona == "matched" and found[-1].row().persona == "writing" and found[0].row().persona is None


def test_a_template_without_a_system_role_falls_back_to_the_user_turn_and_records_it(template_tokenizers):
    formatter = ChatFormatter(template_tokenizers["no_system"])
    found = conditions(StudyConfig(granularities=["full"], placements=["system", "user"]), formatter, ["math"])
    assert [c.name for c in found] == ["none", "matched/full/user", "math/full/user"]
    assert found[1].requested == "system" and found[1].placement == "user"  # what was asked, what was used
    assert found[2].requested == "system"


@pytest.mark.parametrize("config, control, message", [
    (StudyConfig(granularities=["tiny"]), [], "study.granularities: unknown granularity 'tiny'"),
    (StudyConfig(placements=["assistant"]), [], "study.placements: unknown placement 'assistant'"),
    (StudyConfig(control_granularity="long"), [], "study.control_granularity: unknown granularity 'long'"),
    (StudyConfig(), ["pirate"], "study.control_personas: unknown persona 'pirate'"),
    (StudyConfig(granularities=[], placements=[]), [], "the conditions produce no cells"),
])
def test_bad_conditions_end_in_one_line_naming_the_key(smol_tokenizer, config, control, message):
    with pytest.raises(PrismError, match=message):
        conditions(config, ChatFormatter(smol_tokenizer), control)


def test_no_suite_is_an_error():
    with pytest.raises(PrismError, match="no suite selected"):
        cells([Condition("none")], [])


def test_matched_personas_follow_the_suites_own_maps():
    assert matched_persona("MMLU/STEM") == "stem" and matched_persona("MMLU/other") == "helpful"
    assert matched_persona("MT-Bench/coding") == "coding" and matched_persona("MT-Bench/unknown") is None
    assert matched_persona("Safety/HarmBench") == "safety_monitor"


# --------------------------------------------------------------------------- analysis
def _record(condition: Condition, items: dict) -> dict:
    readable = {k: [x for x in v if x is not None] for k, v in items.items()}
    return {"key": f"x|{condition.name}", "suite": "x", "condition": {"name": condition.name},
            "scores": {k: sum(v) / len(v) for k, v in readable.items()}, "counts": {k: len(v) for k, v in readable.items()},
            "unreadable": {k: 0 for k in items}, "intervals": {}, "items": items, "seconds": 1.0, "computed": 1}


def test_analysis_builds_effects_length_placement_and_control():
    config = StudyConfig(granularities=["min", "full"], placements=["system", "user"])
    conds = [Condition("none"), Condition("matched", None, "min", "system"), Condition("matched", None, "min", "user"),
             Condition("matched", None, "full", "system"), Condition("matched", None, "full", "user"),
             Condition("control", "stem", "full", "system"), Condition("control", "math", "full", "system")]
    stem = {"none": [50.0, 50.0], "matched/min/system": [45.0, 45.0], "matched/min/user": [40.0, 40.0],
            "matched/full/system": [40.0, 40.0], "matched/full/user": [35.0, 35.0],
            "stem/full/system": [40.0, 40.0], "math/full/system": [45.0, 45.0]}
    # MT-Bench/unknown has no matched persona: it gets control effects but no matched ones.
    records = [_record(c, {"MMLU/STEM": stem[c.name], "MT-Bench/unknown": [80.0, None]}) for c in conds]
    study = analyse(records, conds, config)
    assert study["subcategories"] == ["MMLU/STEM", "MT-Bench/unknown"]
    assert study["length"]["MMLU/STEM"] == {"min": pytest.approx(-10.0), "full": pytest.approx(-20.0)}
    assert study["placement"]["MMLU/STEM"] == {"system": pytest.approx(-20.0), "user": pytest.approx(-30.0)}
    assert "matched/full/system" not in study["effects"]["MT-Bench/unknown"]
    assert study["effects"]["MT-Bench/unknown"]["math/full/system"]["n"] == 1
    control = study["control"]["MMLU/STEM"]
    assert control["matched"] == "stem" and control["value"] == pytest.approx(-20.0 - (-10.0))
    assert math.isnan(study["control"]["MT-Bench/unknown"]["value"])
    assert study["groups"]["MMLU"]["matched/full/system"] == pytest.approx(-20.0)
    # a group mean names what it averaged and what it skipped, with the reason (never a silent skip)
    assert study["group_members"]["MMLU"]["matched/full/system"] == {"averaged": ["MMLU/STEM"], "skipped": {}}
    assert study["group_members"]["MT-Bench"]["matched/full/system"] == {
        "averaged": [], "skipped": {"MT-Bench/unknown": "no matched persona for this category"}}
    lines = "\n".join(summary_lines(study))
    assert "MT-Bench: mean relative effect" in lines and "skipped: unknown (no matched persona for this category)" \
        in lines


def test_a_group_mean_skips_a_zero_base_subcategory_and_says_so():
    effects = {"MMLU/A": {"c": {"relative": 10.0, "n": 6}}, "MMLU/B": {"c": {"relative": float("nan"), "n": 6}},
               "MMLU/C": {"c": {"relative": float("nan"), "n": 0}}}
    members = group_members(effects, ["MMLU/A", "MMLU/B", "MMLU/C", "MMLU/D"], "c")
    assert members == {"averaged": ["MMLU/A"], "skipped": {
        "MMLU/B": "no-persona score is 0: relative change undefined", "MMLU/C": "no item scored under both conditions",
        "MMLU/D": "no matched persona for this category"}}


# --------------------------------------------------------------------------- prism test reads a study
def _study_file(tmp_path, fingerprint="f00d") -> str:
    cells = [{"condition": {"name": "none"}, "scores": {"MMLU/STEM": 50.0, "MT-Bench/writing": 40.0,
                                                        "Safety/HarmBench": 20.0}},
             {"condition": {"name": "matched/half/system"}, "scores": {"MMLU/STEM": 40.0, "MT-Bench/writing": 60.0,
                                                                       "Safety/HarmBench": None}}]
    path = tmp_path / "study.json"
    path.write_text(json.dumps({"fingerprint": fingerprint, "cells": cells}))
    return str(path)


def test_prism_test_takes_the_routing_analysis_persona_effect_from_a_study(tmp_path):
    from prism_lightning.contexts.personas import PersonaConfig, PersonaRegistry
    from prism_lightning.evaluation.benchmark import BenchmarkConfig, BenchmarkRun
    from prism_lightning.evaluation.suites import SuiteResult

    registry = PersonaRegistry.from_config(PersonaConfig())
    config = BenchmarkConfig(mmlu="", persona_effect=_study_file(tmp_path))
    run = BenchmarkRun(config, registry, [], {}, "system", "half")
    routing = {"MMLU/STEM": 0.1, "MT-Bench/writing": 0.9, "Safety/HarmBench": 0.5}
    run.results["PRISM"] = SuiteResult(scores={k: 1.0 for k in routing}, routing=routing,
                                       items={k: torch.ones(2) for k in routing})
    analysis = run.metrics({"name_or_path": "m", "fingerprint": "f00d"})["routing_analysis"]
    assert analysis["subcategories"] == ["MMLU/STEM", "MT-Bench/writing"]  # HarmBench has no matched score
    assert analysis["persona_effect"] == pytest.approx([-0.2, 0.5])
    assert "matched/half/system vs none" in analysis["effect_source"]
    with pytest.raises(PrismError, match="studied base weights f00d, this run's are beef"):
        run.metrics({"name_or_path": "m", "fingerprint": "beef"})


def test_a_study_without_the_runs_condition_or_file_is_one_line(tmp_path):
    from prism_lightning.contexts.personas import PersonaConfig, PersonaRegistry
    from prism_lightning.evaluation.benchmark import BenchmarkConfig, BenchmarkRun

    registry = PersonaRegistry.from_config(PersonaConfig())
    with pytest.raises(PrismError, match="no 'matched/full/user' cells next to 'none'"):
        BenchmarkRun(BenchmarkConfig(mmlu="", persona_effect=_study_file(tmp_path)), registry, [], {}, "user", "full")
    with pytest.raises(PrismError, match="not found"):
        BenchmarkRun(BenchmarkConfig(mmlu="", persona_effect=str(tmp_path / "nope.json")), registry, [], {})
