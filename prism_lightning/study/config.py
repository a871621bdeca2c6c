"""What `prism study` measures: which persona conditions, on which suites."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from prism_lightning.evaluation.benchmark import BenchmarkConfig


@dataclass(frozen=True)
class StudyConfig:
    """Persona conditions of the study; every condition is scored on the same suites.

    Args:
        granularities: persona lengths of the matched-persona conditions (``min``, ``half``, ``full``).
        placements: where the persona goes (``system``, ``user``); a template without a system role uses the
            user turn and the study records the fallback.
        control_personas: the other-persona control: each is put on every category (None = the run's
            ``data.personas.names``; an empty list turns the control off).
        control_granularity: persona length of the control conditions.
        suites: the suites and their sizes (None = ``data.benchmark``, what ``prism test`` evaluates).
        dry_run: print the cells and an estimate of prompts and tokens, then stop.
    """

    granularities: list[str] = field(default_factory=lambda: ["min", "half", "full"])
    placements: list[str] = field(default_factory=lambda: ["system", "user"])
    control_personas: Optional[list[str]] = None
    control_granularity: str = "full"
    suites: Optional[BenchmarkConfig] = None
    dry_run: bool = False
