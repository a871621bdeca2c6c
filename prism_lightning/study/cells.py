"""The study's cells: persona conditions (none, matched at each length and placement, other-persona controls) x suites."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from prism_lightning.contexts.domains import DOMAINS, GRANULARITIES
from prism_lightning.evaluation.benchmarks import MT_BENCH_PERSONA
from prism_lightning.evaluation.mmlu import CATEGORY_PERSONA
from prism_lightning.evaluation.rows import MATCHED, Row
from prism_lightning.evaluation.suites import SAFETY_PERSONA
from prism_lightning.model.chat import PLACEMENTS, ChatFormatter
from prism_lightning.study.config import StudyConfig
from prism_lightning.utils.errors import PrismError

SUITES = ("mmlu", "mt_bench", "safety")


@dataclass(frozen=True)
class Condition:
    """How the prompt is built: no persona, the category's matched persona, or one control persona for all.

    ``placement`` is where the persona went; ``requested`` the placement asked for when the template has no
    system role and the user turn was used instead.
    """

    kind: str  # "none" | "matched" | "control"
    persona: Optional[str] = None
    granularity: Optional[str] = None
    placement: Optional[str] = None
    requested: Optional[str] = None

    @property
    def name(self) -> str:
        """``none``, ``matched/<granularity>/<placement>`` or ``<persona>/<granularity>/<placement>``."""
        if self.kind == "none":
            return "none"
        return f"{'matched' if self.kind == 'matched' else self.persona}/{self.granularity}/{self.placement}"

    def row(self) -> Row:
        """The evaluation row that prompts this way on the base model."""
        persona = {"none": None, "matched": MATCHED}.get(self.kind, self.persona)
        return Row(self.name, "base", persona)


@dataclass(frozen=True)
class Cell:
    """One condition on one suite: the unit that is computed, stored and resumed."""

    condition: Condition
    suite: str

    @property
    def key(self) -> str:
        """Stable identifier of the cell in the resume file."""
        return f"{self.suite}|{self.condition.name}"


def matched_persona(subcategory: str) -> Optional[str]:
    """The persona matched to a subcategory (``MMLU/STEM`` -> ``stem``); None when the suite maps none."""
    suite, _, name = subcategory.partition("/")
    if suite == "MMLU":
        return CATEGORY_PERSONA.get(name)
    if suite == "MT-Bench":
        return MT_BENCH_PERSONA.get(name)
    return SAFETY_PERSONA if suite == "Safety" else None


def _check(values: Sequence[str], allowed: Sequence[str], key: str, what: str) -> None:
    for value in values:
        if value not in allowed:
            raise PrismError(f"{key}: unknown {what} {value!r}; expected one of {', '.join(allowed)}")


def check_config(config: StudyConfig, control_personas: Sequence[str]) -> None:
    """Unknown granularities, placements or personas: one line naming the key, before any model work."""
    _check(config.granularities, GRANULARITIES, "study.granularities", "granularity")
    _check([config.control_granularity], GRANULARITIES, "study.control_granularity", "granularity")
    _check(config.placements, PLACEMENTS, "study.placements", "placement")
    _check(control_personas, list(DOMAINS), "study.control_personas", "persona")


def conditions(config: StudyConfig, formatter: ChatFormatter, control_personas: Sequence[str]) -> list[Condition]:
    """No persona, matched personas at each granularity x placement, then each control persona; duplicates that a
    placement fallback creates are dropped (the kept condition records what was asked)."""
    check_config(config, control_personas)
    found: dict[str, Condition] = {"none": Condition("none")}

    def add(kind: str, persona: Optional[str], granularity: str, placement: str) -> None:
        used = formatter.effective_placement(placement)
        condition = Condition(kind, persona, granularity, used, placement if used != placement else None)
        found.setdefault(condition.name, condition)

    for granularity in config.granularities:
        for placement in config.placements:
            add("matched", None, granularity, placement)
    control_placement = config.placements[0] if config.placements else "system"
    for persona in control_personas:
        add("control", persona, config.control_granularity, control_placement)
    if len(found) == 1:
        raise PrismError("study: the conditions produce no cells besides no persona; list study.granularities and "
                         "study.placements, or study.control_personas")
    return list(found.values())


def cells(conditions: Sequence[Condition], suites: Sequence[str]) -> list[Cell]:
    """Every condition on every suite, suite-major so each suite's cells share the evaluation cache back to back."""
    if not suites:
        raise PrismError("study: no suite selected (set mmlu, mt_bench, harmbench or prompt_sets under "
                         "study.suites or data.benchmark)")
    return [Cell(c, s) for s in suites for c in conditions]
