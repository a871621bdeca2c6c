"""Stage 1: the base model writes queries per persona from varied prompts; parse, filter, dedup."""

from __future__ import annotations

import math
import re
from typing import Iterable, Optional

from prism_lightning.bootstrap.config import QueryConfig
from prism_lightning.contexts.kinds import KINDS, candidate_frame
from prism_lightning.contexts.personas import Persona, PersonaRegistry
from prism_lightning.model.backbone import Backbone
from prism_lightning.model.chat import ChatFormatter
from prism_lightning.model.generation import Engine, generate_into
from prism_lightning.utils.jsonl import JsonlSink

_PREFIX = re.compile(r"^\s*(?:[*_]{0,2}\s*(?:user'?s?\s+)?(?:question|query|request|message|q)\s*#?\s*\d*\s*"
                     r"[*_]{0,2}\s*[:.)\-]\s*[*_]{0,2}|\d+\s*[.):](?=\s)|[-*•](?=\s))\s*", re.IGNORECASE)
# Preambles ("Sure! Here is a question:") and label lines ending in a colon, never a line that asks something.
_META = re.compile(r"^(?!.*\?)(?:(?:sure|here|okay|ok|certainly|of course)\b[^.?]*[!,.:]\s*$|.*:\s*$)",
                   re.IGNORECASE)
_WORD = re.compile(r"[a-z0-9]+")


def candidate_prompt(persona: Persona, index: int, knowledge_every: int = 0) -> str:
    """The index-th query-generation prompt: frame, topic and question style all vary with the index."""
    frame, _ = candidate_frame(persona.kind, index, persona.topics, persona.question_styles, knowledge_every)
    return frame.replace("{context}", persona.source_text)


def candidate_intent(persona: Persona, index: int, knowledge_every: int = 0) -> str:
    """``inside`` when the index-th prompt asks for a question the context answers, else ``outside``."""
    return candidate_frame(persona.kind, index, persona.topics, persona.question_styles, knowledge_every)[1]


def parse_query(text: str, config: QueryConfig) -> Optional[str]:
    """Extract the question from a generation: skip preambles, strip numbering and quotes, check length."""
    paragraphs = [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    for paragraph in paragraphs:
        lines = [ln.strip() for ln in paragraph.splitlines() if ln.strip() and not _META.match(ln.strip())]
        if lines:
            break
    else:
        return None
    query = " ".join(_PREFIX.sub("", ln, count=1) for ln in lines)
    query = re.sub(r"\s+", " ", query).strip().strip("\"'`*“”").strip()
    if not (config.min_chars <= len(query) <= config.max_chars) or len(query.split()) < config.min_words:
        return None
    return query


def _words(text: str) -> frozenset[str]:
    return frozenset(_WORD.findall(text.lower()))


def dedup(queries: Iterable[str], threshold: float, seen: Optional[list[frozenset[str]]] = None) -> list[str]:
    """Drop exact (normalised) and near duplicates (word-set Jaccard ≥ threshold), also against ``seen``."""
    seen = [] if seen is None else seen
    kept = []
    for query in queries:
        words = _words(query)
        if any(len(words & s) / max(1, len(words | s)) >= threshold for s in seen):
            continue
        seen.append(words)
        kept.append(query)
    return kept


def select_queries(raw: list[dict], registry: PersonaRegistry, config: QueryConfig,
                   knowledge_every: int = 0) -> list[dict]:
    """Turn raw generations into the final query list: parsed, filtered, deduplicated across personas."""
    seen: list[frozenset[str]] = []
    selected = []
    for persona in registry:
        rows = sorted((r for r in raw if r["persona"] == persona.name), key=lambda r: r["index"])
        parsed = [q for q in (parse_query(r["text"], config) for r in rows) if q]
        kept = dedup(parsed, config.near_duplicate, list(seen))[:config.per_persona]
        seen += [_words(q) for q in kept]  # only kept queries block later personas
        intents: dict[str, str] = {}
        for r in rows:  # dedup keeps a query's first occurrence: so does its intent
            if (q := parse_query(r["text"], config)) is not None:
                intents.setdefault(q, candidate_intent(persona, r["index"], knowledge_every))
        for n, query in enumerate(kept):
            row = {"id": f"{persona.name}-{n:04d}", "persona": persona.name, "query": query}
            # Contexts (and personas under the intent protocol) also get questions they do not help with.
            if persona.kind != "persona" or knowledge_every:
                row["intent"] = intents[query]
            selected.append(row)
    return selected


def run_queries(backbone: Backbone, registry: PersonaRegistry, config: QueryConfig, sink: JsonlSink,
                knowledge_every: int = 0, engine: Optional[Engine] = None) -> list[dict]:
    """Generate candidates in rounds until each persona has ``per_persona`` queries or rounds run out.

    ``knowledge_every`` > 0 (the intent protocol): every n-th candidate of a persona is a knowledge question.
    """
    formatter = ChatFormatter(backbone.tokenizer)
    per_round = math.ceil(config.per_persona * config.oversample)
    selected: list[dict] = []
    for round_ in range(config.max_rounds):
        counts = {p: sum(1 for q in selected if q["persona"] == p) for p in registry.names}
        short = [p for p in registry if counts[p.name] < config.per_persona]
        if not short:
            break
        items = []
        for persona in short:
            for index in range(round_ * per_round, (round_ + 1) * per_round):
                items.append({"id": f"{persona.name}/{index}", "persona": persona.name, "index": index,
                              "prompt_ids": formatter.prompt_ids(candidate_prompt(persona, index, knowledge_every),
                                                                 KINDS[persona.kind].curator)})
        generate_into(backbone, items, config.decoding, sink, f"stage 1 queries (round {round_ + 1})",
                      lambda item, out: {"id": item["id"], "persona": item["persona"], "index": item["index"],
                                         **out}, engine)
        selected = select_queries(sink.records(), registry, config, knowledge_every)
    return selected
