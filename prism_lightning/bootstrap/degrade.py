"""Degraded copies of an answer: the quality controls of stage 3 (the own answer must beat its degraded copy).

Three kinds, cycled over the control queries so that a judge that sees only one kind of damage cannot pass:

- ``shuffle``: the answer's sentences in a seeded random order (a derangement where possible; word chunks when the
  answer is one sentence) — the same words and length, the discourse broken;
- ``cut``: the first 40 % of the words, ending mid-sentence — shorter, unfinished;
- ``splice``: the middle third of the words replaced by the same number of words from another query's answer —
  the same length, a span off topic.

Each is a pure function of the text (and a seed): no model, reproducible, unit-tested.
"""

from __future__ import annotations

import random
import re

KINDS = ("shuffle", "cut", "splice")
# Part of the judge stage's hash: changing a generator changes the control items, so their scores are redone.
VERSION = 1
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _chunks(text: str) -> list[str]:
    """Sentences, or runs of about six words when the text is a single sentence."""
    sentences = [s for s in _SENTENCE_END.split(text.strip()) if s]
    if len(sentences) > 1:
        return sentences
    words = text.split()
    return [" ".join(words[k:k + 6]) for k in range(0, len(words), 6)]


def shuffle(text: str, seed: int = 0) -> str:
    """The sentences (or word chunks) of ``text`` in another order; unchanged only when there is a single chunk."""
    parts = _chunks(text)
    if len(parts) < 2:
        return text
    order = list(range(len(parts)))
    rng = random.Random(seed)
    for _ in range(20):  # a derangement-like order: few chunks stay in place
        rng.shuffle(order)
        if order != sorted(order):
            break
    return " ".join(parts[i] for i in order)


def cut(text: str, keep: float = 0.4) -> str:
    """The first ``keep`` share of the words (at least one), without a closing punctuation mark."""
    words = text.split()
    kept = " ".join(words[:max(1, int(len(words) * keep))])
    return kept.rstrip(".!?;:,")


def splice(text: str, donor: str) -> str:
    """The middle third of ``text``'s words replaced by as many words from ``donor`` (repeated if it is short)."""
    words, other = text.split(), donor.split()
    if len(words) < 3 or not other:
        return " ".join(other or words)
    start, stop = len(words) // 3, 2 * len(words) // 3
    span = [other[k % len(other)] for k in range(stop - start)]
    return " ".join(words[:start] + span + words[stop:])


def degrade(text: str, kind: str, donor: str = "", seed: int = 0) -> str:
    """``text`` damaged as ``kind`` (one of ``KINDS``)."""
    if kind == "shuffle":
        return shuffle(text, seed)
    if kind == "cut":
        return cut(text)
    if kind == "splice":
        return splice(text, donor)
    raise ValueError(f"degradation must be one of {', '.join(KINDS)}, got {kind!r}")
