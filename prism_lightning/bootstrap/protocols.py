"""Judge decision rules as pure functions of choice-token log-probabilities (unit-tested on constructed inputs).

Pairwise judging runs every pair in two orders: ``first`` shows (A = baseline, B = candidate) and
``second`` shows (A = candidate, B = baseline). Log-prob columns are (A, B, TIE).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

A, B, TIE = 0, 1, 2


@dataclass(frozen=True)
class PairwiseDecision:
    """Per-pair outcome tensors of one protocol."""

    label: torch.Tensor          # bool: the candidate (persona answer) wins
    margin: torch.Tensor         # mean of the two orders' candidate-minus-baseline log-prob margins
    candidate_wins_both: torch.Tensor
    position_biased: torch.Tensor  # both orders picked the same letter, i.e. the position, not the content
    ties: torch.Tensor           # number of orders (0, 1, 2) whose top choice was TIE
    unparseable: torch.Tensor    # too little probability on the choice tokens in either order


def decide_pairwise(first: torch.Tensor, second: torch.Tensor, protocol: str, margin: float = 0.0,
                    min_choice_mass: float = 0.0) -> PairwiseDecision:
    """Apply ``strict`` (candidate wins both orders) or ``debiased`` (mean margin > ``margin``) to [n, 3] log-probs."""
    if protocol not in ("strict", "debiased"):
        raise ValueError(f"pairwise protocol must be strict or debiased, got {protocol!r}")
    m_first = first[:, B] - first[:, A]      # candidate is B in the first order
    m_second = second[:, A] - second[:, B]   # candidate is A in the second order
    mean_margin = (m_first + m_second) / 2   # a constant preference for one position cancels here
    top_first, top_second = first.argmax(-1), second.argmax(-1)
    wins_both = (top_first == B) & (top_second == A)
    biased = (top_first == top_second) & (top_first != TIE)
    ties = (top_first == TIE).long() + (top_second == TIE).long()
    mass = torch.minimum(first.exp().sum(-1), second.exp().sum(-1))
    unparseable = mass < min_choice_mass
    label = wins_both if protocol == "strict" else mean_margin > margin
    return PairwiseDecision(label=label & ~unparseable, margin=mean_margin, candidate_wins_both=wins_both,
                            position_biased=biased, ties=ties, unparseable=unparseable)


def decide_scores(candidate: torch.Tensor, baseline: torch.Tensor, unparseable: torch.Tensor,
                  margin: float = 0.0) -> PairwiseDecision:
    """Compare two per-answer scores (pointwise grades, likelihoods): the candidate wins by more than ``margin``.

    Each answer is scored alone, so there is no position and no tie between orders to report.
    """
    diff = candidate - baseline
    none = torch.zeros_like(diff, dtype=torch.bool)
    return PairwiseDecision(label=(diff > margin) & ~unparseable, margin=diff, candidate_wins_both=none,
                            position_biased=none, ties=torch.zeros_like(diff, dtype=torch.long),
                            unparseable=unparseable)


def likelihood_score(cond: torch.Tensor, uncond: torch.Tensor, tokens: torch.Tensor,
                     form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token score of an answer and whether it is unreadable (no tokens), from summed log-likelihoods.

    ``likelihood``: log p(answer | query) / tokens. ``pmi``: (log p(answer | query) − log p(answer)) / tokens,
    the part of the likelihood that the query explains (it discounts answers that are likely anywhere).
    """
    if form not in ("likelihood", "pmi"):
        raise ValueError(f"likelihood form must be likelihood or pmi, got {form!r}")
    total = cond - uncond if form == "pmi" else cond
    empty = tokens <= 0
    return total / tokens.clamp_min(1), empty


def expected_score(grade_logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected 1–10 grade and its probability mass from log P(grade g is the answer), g = 1..10 ([n, 10]).

    The columns are complete-answer log-probs (``choices.ChoiceReader``), so a tokenizer that writes "10" as
    "1", "0" has already had the grade 10 taken out of the grade 1.
    """
    probs = grade_logprobs.double().exp()
    grades = torch.arange(1, probs.shape[-1] + 1, dtype=probs.dtype)
    mass = probs.sum(-1)
    score = (probs @ grades) / mass.clamp_min(1e-12)
    return score.float(), mass.float()
