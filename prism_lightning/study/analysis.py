"""From finished cells to the study's results: per-cell scores, persona effects, length, placement, control."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from prism_lightning.study.cells import Condition, matched_persona
from prism_lightning.study.config import StudyConfig
from prism_lightning.study.effects import control_gain, mean_finite, persona_effect

GROUPS = ("MMLU", "MT-Bench", "Safety")


def _tensor(values: Sequence[Optional[float]]) -> torch.Tensor:
    return torch.tensor([float("nan") if v is None else v for v in values], dtype=torch.float64)


def _order(key: str) -> tuple:
    group = key.split("/")[0]
    return (GROUPS.index(group) if group in GROUPS else len(GROUPS), key)


def longest_granularity(config: StudyConfig) -> Optional[str]:
    """The longest persona the study ran: what the placement comparison uses."""
    for granularity in ("full", "half", "min"):
        if granularity in config.granularities:
            return granularity
    return None


def analyse(records: Sequence[dict], conditions: Sequence[Condition], config: StudyConfig, seed: int = 0) -> dict:
    """Cells, effects of every condition against no persona, the length curve, placement, and the control."""
    items: dict[str, dict[str, torch.Tensor]] = {}
    for record in records:
        for key, values in record["items"].items():
            items.setdefault(record["condition"]["name"], {})[key] = _tensor(values)
    none = items.get("none", {})
    subcategories = sorted(none, key=_order)
    effects: dict[str, dict[str, dict]] = {}
    for sub in subcategories:
        effects[sub] = {}
        for condition in conditions:
            if condition.kind == "none" or (condition.kind == "matched" and matched_persona(sub) is None):
                continue  # a category without a matched persona has no matched effect (it would read as 0)
            effects[sub][condition.name] = persona_effect(items[condition.name][sub], none[sub], seed)
    matched = [c for c in conditions if c.kind == "matched"]
    main = matched[0].placement if matched else None
    longest = longest_granularity(config)
    length = {sub: {c.granularity: _relative(effects, sub, c.name) for c in matched if c.placement == main}
              for sub in subcategories}
    placement = {sub: {c.placement: _relative(effects, sub, c.name) for c in matched if c.granularity == longest}
                 for sub in subcategories}
    controls = [c for c in conditions if c.kind == "control"]
    control = {sub: _control(items, sub, controls, none[sub], seed) for sub in subcategories} if controls else {}
    present = [g for g in GROUPS if any(s.startswith(g + "/") for s in subcategories)]
    members = {g: {c.name: group_members(effects, [s for s in subcategories if s.startswith(g + "/")], c.name)
                   for c in conditions if c.kind != "none"} for g in present}
    groups = {g: {name: mean_finite([_relative(effects, s, name) for s in m["averaged"]])
                  for name, m in members[g].items()} for g in present}
    cells = [{k: r[k] for k in ("key", "suite", "condition", "scores", "counts", "unreadable", "intervals",
                                "seconds", "computed")} for r in records]
    return {"subcategories": subcategories, "conditions": [c.name for c in conditions], "cells": cells,
            "effects": effects, "length": length, "placement": placement, "control": control,
            "groups": groups, "group_members": members, "main_placement": main, "longest_granularity": longest,
            "effect": "relative: (condition − no persona) / no persona × 100; absolute in points; paired bootstrap "
                      "95% intervals over the items both scored",
            "control_definition": "matched lift minus the mean lift of the non-matched control personas "
                                  "(lift = relative effect), at the control granularity and placement"}


def group_members(effects: dict, subs: Sequence[str], name: str) -> dict:
    """The subcategories a group mean of ``name`` averages, and those it skips with the reason."""
    averaged, skipped = [], {}
    for sub in subs:
        found = effects.get(sub, {}).get(name)
        if found is None:
            skipped[sub] = "no matched persona for this category"
        elif found["n"] == 0:
            skipped[sub] = "no item scored under both conditions"
        elif not is_finite(found["relative"]):
            skipped[sub] = "no-persona score is 0: relative change undefined"
        else:
            averaged.append(sub)
    return {"averaged": averaged, "skipped": skipped}


def _relative(effects: dict, sub: str, name: str) -> float:
    found = effects.get(sub, {}).get(name)
    return found["relative"] if found else float("nan")


def _control(items: dict, sub: str, controls: Sequence[Condition], none: torch.Tensor, seed: int) -> dict:
    """The other-persona control of one subcategory; the matched persona's own cell at the control settings."""
    persona = matched_persona(sub)
    if persona is None or not controls:
        return {"value": float("nan"), "ci95": None, "n": 0, "others": 0,
                "note": "no matched persona for this category", "no_interval": "no matched persona"}
    granularity, placement = controls[0].granularity, controls[0].placement
    name = next((c.name for c in controls if c.persona == persona), f"matched/{granularity}/{placement}")
    if name not in items:
        return {"value": float("nan"), "ci95": None, "n": 0, "others": 0,
                "note": f"no cell of the matched persona {persona!r} at {granularity}/{placement}",
                "no_interval": "no matched cell"}
    others = [items[c.name][sub] for c in controls if c.persona != persona]
    return {**control_gain(items[name][sub], others, none, seed), "matched": persona}


def is_finite(value: Optional[float]) -> bool:
    """A number that is neither None nor NaN."""
    return value is not None and math.isfinite(value)


