"""Stage 2: a baseline answer (no persona) and persona answers for every query, ``samples`` of each."""

from __future__ import annotations

import dataclasses
from typing import Optional

from prism_lightning.bootstrap.config import AnswerConfig
from prism_lightning.contexts.personas import PersonaRegistry
from prism_lightning.model.backbone import Backbone
from prism_lightning.model.chat import ChatFormatter
from prism_lightning.model.generation import Engine, generate_into
from prism_lightning.utils.jsonl import JsonlSink

BASELINE = "__base__"


def sample_key(name: str, sample: int) -> str:
    """The answer key of the ``sample``-th answer under ``name``: sample 0 keeps the bare name (m = 1 as before)."""
    return name if sample == 0 else f"{name}~{sample}"


def answer_personas(query: dict, registry: PersonaRegistry, config: AnswerConfig) -> list[str]:
    """Personas that answer ``query``: its own (matched) or all of them (best-of-K)."""
    return registry.names if config.mode == "best_of_k" else [query["persona"]]


def run_answers(backbone: Backbone, formatter: ChatFormatter, registry: PersonaRegistry, queries: list[dict],
                config: AnswerConfig, sink: JsonlSink, samples: int = 1,
                engine: Optional[Engine] = None) -> dict[str, dict[str, str]]:
    """Generate missing answers; returns ``{query_id: {answer key: text}}`` (``sample_key`` of persona or
    ``__base__``).

    The ``samples`` answers to one prompt are adjacent rows of the same prompt, so they land in one ``generate``
    call: the batch holds ``decoding.batch_size`` prompts × ``samples`` rows, each row its own draw.
    """
    items = []
    for query in queries:
        conditions = [(BASELINE, formatter.prompt_ids(query["query"]))]
        conditions += [(name, formatter.prompt_ids(query["query"], registry[name].text, registry[name].placement))
                       for name in answer_personas(query, registry, config)]
        for name, prompt_ids in conditions:
            for sample in range(samples):
                key = sample_key(name, sample)
                items.append({"id": f"{query['id']}/{key}", "query_id": query["id"], "persona": name, "key": key,
                              "prompt_ids": prompt_ids})
    decoding = config.decoding if samples == 1 else dataclasses.replace(
        config.decoding, batch_size=config.decoding.batch_size * samples)
    generate_into(backbone, items, decoding, sink, "stage 2 answers",
                  lambda item, out: {"id": item["id"], "query_id": item["query_id"], "persona": item["persona"],
                                     **out}, engine)
    answers: dict[str, dict[str, str]] = {}
    for item in items:
        answers.setdefault(item["query_id"], {})[item["key"]] = sink.get(item["id"])["text"]
    return answers
