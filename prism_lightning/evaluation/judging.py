"""The evaluation judge: 1–10 grades and yes/no verdicts read from next-token log-probabilities."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from prism_lightning.bootstrap.judge import single_token
from prism_lightning.bootstrap.protocols import expected_score, split_grade_logprobs
from prism_lightning.chat import ChatFormatter

# (prompts, token ids, tail) -> log-probs of those tokens after each prompt's last ``tail`` positions [n, tail, k].
LogprobFn = Callable[[Sequence[Sequence[int]], Sequence[int], int], torch.Tensor]


@dataclass
class Verdicts:
    """Scores with the probability mass they rest on; ``readable`` is False where the mass is too small."""

    values: torch.Tensor
    mass: torch.Tensor
    readable: torch.Tensor


class EvalJudge:
    """Greedy by construction: verdicts come from the choice tokens' probabilities, never from sampled text.

    ``logprobs`` is a ``LogprobFn``; for a self-judge it runs the base model with the adapter off, so the judge
    is the same for every row.
    """

    def __init__(self, formatter: ChatFormatter, logprobs: LogprobFn, system: str, min_mass: float = 0.05) -> None:
        self.formatter, self.logprobs, self.system, self.min_mass = formatter, logprobs, system, min_mass
        tok = formatter.tokenizer
        self.digits = [single_token(tok, str(d)) for d in range(1, 10)]
        self.zero = single_token(tok, "0")
        self.yes, self.no = single_token(tok, "Yes"), single_token(tok, "No")

    def _ids(self, prompts: Sequence[str]) -> list[list[int]]:
        return [self.formatter.prompt_ids(p, self.system) for p in prompts]

    def grade(self, prompts: Sequence[str]) -> Verdicts:
        """Expected 1–10 grade per prompt (the prompt asks for a number)."""
        lp = self.logprobs([i + [self.digits[0]] for i in self._ids(prompts)], self.digits + [self.zero], 2)
        score, mass = expected_score(*split_grade_logprobs(lp))
        return Verdicts(score, mass, mass >= self.min_mass)

    def yes_probability(self, prompts: Sequence[str]) -> Verdicts:
        """P(Yes) / (P(Yes) + P(No)) per prompt."""
        p_yes, p_no = self.logprobs(self._ids(prompts), [self.yes, self.no], 1)[:, 0].exp().unbind(-1)
        mass = p_yes + p_no
        return Verdicts(p_yes / mass.clamp_min(1e-12), mass, mass >= self.min_mass)
