"""Configuration of the three bootstrap stages (queries, answers, self-verification)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, Optional

from prism_lightning.model.backbone import BackboneConfig
from prism_lightning.model.generation import DecodingConfig


@dataclass(frozen=True)
class QueryConfig:
    """Stage 1: queries written by the base model for each persona.

    Args:
        per_persona: queries kept per persona (paper: 50).
        oversample: candidates generated per kept query in a round (parsing and dedup drop some).
        max_rounds: rounds of extra candidates when a persona is still short.
        min_chars: shortest query kept.
        max_chars: longest query kept.
        min_words: fewest words in a kept query.
        near_duplicate: word-set Jaccard at or above which two queries count as duplicates.
        decoding: sampling parameters for query generation.
        knowledge_every: under ``data.judge.protocol: intent``, every n-th candidate of a persona is a knowledge
            question (short factual or multiple-choice, in the persona's domain or in general), labelled retain by
            construction; 2 = half of them. Ignored by every other protocol (the paper's stage 1).
    """

    per_persona: int = 50
    oversample: float = 1.5
    max_rounds: int = 3
    min_chars: int = 20
    max_chars: int = 400
    min_words: int = 4
    near_duplicate: float = 0.7
    decoding: DecodingConfig = field(default_factory=lambda: DecodingConfig(
        temperature=0.9, top_p=1.0, top_k=0, max_new_tokens=96, seed=1))
    knowledge_every: int = 2


@dataclass(frozen=True)
class AnswerConfig:
    """Stage 2: a baseline answer (no persona) and persona answers per query.

    Args:
        mode: ``matched`` answers with the persona that wrote the query (default); ``best_of_k`` with every
            persona, and the best-judged one becomes the distillation target.
        decoding: decoding parameters for answers.
    """

    mode: Literal["matched", "best_of_k"] = "matched"
    decoding: DecodingConfig = field(default_factory=lambda: DecodingConfig(
        temperature=0.7, top_p=1.0, top_k=0, max_new_tokens=256, seed=2))


@dataclass(frozen=True)
class LabelConfig:
    """How many judged pairs make one query's label.

    Args:
        samples: m answers per condition (baseline and persona) per query, sampled in the same batches; pair i
            (persona sample i vs baseline sample i) is judged as one pair. The label is the estimated probability
            that the persona answer wins (hard label: above 0.5), and with m >= 2 the labels' split-half
            reliability is measured. 1 (default) is the paper's one pair per query.
    """

    samples: int = 1


@dataclass(frozen=True)
class JudgeConfig:
    """Stage 3: self-verification of persona answer vs baseline answer.

    Args:
        protocol: ``strict`` (paper: the persona wins in both orders), ``debiased`` (mean of the two orders'
            A/B log-prob margins, which cancels a constant position bias, must exceed ``margin``),
            ``pointwise`` (expected 1–10 score from log-probs; persona score − baseline score > ``margin``),
            ``likelihood`` (mean per-token log p(answer | query), no persona in the context) or ``pmi`` (mean
            per-token log p(answer | query) − log p(answer)); the last two compare the two answers' scores.
        margin: decision threshold: nats (``debiased``), score points (``pointwise``), nats per token
            (``likelihood``, ``pmi``). ``intent`` labels by what a query asks for: stage 1 also writes knowledge
            questions (``data.queries.knowledge_every``), labelled retain by construction, and a context's
            outside questions likewise; the persona-domain queries take ``intent_scorer``'s label.
        model: a separate judge model; unset = the base model judges itself.
        max_answer_tokens: each answer is cut to this many tokens before judging.
        control_pairs: queries whose own answer is checked against another query's answer (relevance control)
            and against a degraded copy of itself (quality control).
        min_choice_mass: below this probability on the choice tokens a verdict counts as unparseable.
        batch_size: judge prompts per forward pass.
        compare: also score every pair under every protocol and report them side by side (control accuracies,
            distill rate, position bias, agreement); the corpus keeps ``protocol``'s labels.
        intent_scorer: under ``intent``, the protocol that labels persona-domain queries (any of the others), or
            ``none``: they are distill by construction and stage 3 judges nothing.
    """

    protocol: Literal["strict", "debiased", "pointwise", "likelihood", "pmi", "intent"] = "debiased"
    margin: float = 0.0
    model: Optional[BackboneConfig] = None
    max_answer_tokens: int = 256
    control_pairs: int = 48
    min_choice_mass: float = 0.05
    batch_size: int = 8
    compare: bool = False
    intent_scorer: Literal["none", "strict", "debiased", "pointwise", "likelihood", "pmi"] = "none"

    @property
    def scoring(self) -> Optional[str]:
        """The protocol whose verdicts become labels: the protocol itself, ``intent_scorer`` under ``intent``
        (None when that is ``none``: no label is measured)."""
        if self.protocol != "intent":
            return self.protocol
        return None if self.intent_scorer == "none" else self.intent_scorer

    def scored(self) -> Optional["JudgeConfig"]:
        """This config with ``protocol`` set to the scoring protocol (what the decision rules read), or None."""
        return None if self.scoring is None else replace(self, protocol=self.scoring)
