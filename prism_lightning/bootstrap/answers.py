"""Stage 2: a baseline answer (no persona) and persona answers for every query."""

from __future__ import annotations

from prism_lightning.bootstrap.config import AnswerConfig
from prism_lightning.contexts.personas import PersonaRegistry
from prism_lightning.model.backbone import Backbone
from prism_lightning.model.chat import ChatFormatter
from prism_lightning.model.generation import generate_into
from prism_lightning.utils.jsonl import JsonlSink

BASELINE = "__base__"


def answer_personas(query: dict, registry: PersonaRegistry, config: AnswerConfig) -> list[str]:
    """Personas that answer ``query``: its own (matched) or all of them (best-of-K)."""
    return registry.names if config.mode == "best_of_k" else [query["persona"]]


def run_answers(backbone: Backbone, formatter: ChatFormatter, registry: PersonaRegistry, queries: list[dict],
                config: AnswerConfig, sink: JsonlSink) -> dict[str, dict[str, str]]:
    """Generate missing answers; returns ``{query_id: {persona_or___base__: text}}``."""
    items = []
    for query in queries:
        items.append({"id": f"{query['id']}/{BASELINE}", "query_id": query["id"], "persona": BASELINE,
                      "prompt_ids": formatter.prompt_ids(query["query"])})
        for name in answer_personas(query, registry, config):
            items.append({"id": f"{query['id']}/{name}", "query_id": query["id"], "persona": name,
                          "prompt_ids": formatter.prompt_ids(query["query"], registry[name].text,
                                                             registry[name].placement)})
    generate_into(backbone, items, config.decoding, sink, "stage 2 answers",
                  lambda item, out: {"id": item["id"], "query_id": item["query_id"], "persona": item["persona"],
                                     **out})
    answers: dict[str, dict[str, str]] = {}
    for item in items:
        answers.setdefault(item["query_id"], {})[item["persona"]] = sink.get(item["id"])["text"]
    return answers
