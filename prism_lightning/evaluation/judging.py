"""The evaluation judge: 1–10 grades and yes/no verdicts read from the log-probabilities of the answers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from prism_lightning.bootstrap.judge import GRADES
from prism_lightning.bootstrap.protocols import expected_score
from prism_lightning.model.chat import ChatFormatter
from prism_lightning.model.choices import ChoiceReader, LogprobFn, require_direct_answer


@dataclass
class Verdicts:
    """Scores with the probability mass they rest on; ``readable`` is False where the mass is too small."""

    values: torch.Tensor
    mass: torch.Tensor
    readable: torch.Tensor


class EvalJudge:
    """Greedy by construction: verdicts come from the probabilities of the answers' tokens, never from sampled text.

    ``logprobs`` is a ``LogprobFn``; for a self-judge it runs the base model with the adapter off, so the judge
    is the same for every row.
    """

    def __init__(self, formatter: ChatFormatter, logprobs: LogprobFn, system: str, min_mass: float = 0.05) -> None:
        self.formatter, self.logprobs, self.system, self.min_mass = formatter, logprobs, system, min_mass
        require_direct_answer(formatter, "evaluation judge", "set data.benchmark.judge to a non-reasoning judge model")
        self.grades = ChoiceReader(formatter.tokenizer, GRADES)
        self.yes_no = ChoiceReader(formatter.tokenizer, ("Yes", "No"))

    def _ids(self, prompts: Sequence[str]) -> list[list[int]]:
        return [self.formatter.prompt_ids(p, self.system) for p in prompts]

    def grade(self, prompts: Sequence[str]) -> Verdicts:
        """Expected 1–10 grade per prompt (the prompt asks for a number)."""
        score, mass = expected_score(self.grades.read(self.logprobs, self._ids(prompts)).logprobs)
        return Verdicts(score, mass, mass >= self.min_mass)

    def yes_probability(self, prompts: Sequence[str]) -> Verdicts:
        """P(Yes) / (P(Yes) + P(No)) per prompt."""
        read = self.yes_no.read(self.logprobs, self._ids(prompts))
        p_yes = read.logprobs[:, 0].exp()
        return Verdicts(p_yes / read.mass.clamp_min(1e-12), read.mass, read.mass >= self.min_mass)
