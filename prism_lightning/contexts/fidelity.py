"""Fidelity of a compressed context, judge-free: probe questions whose answer is in the context, scored by the
likelihood of each choice, for the base model without the context, with it prepended, and PRISM without it; plus
the gate's opening rate on probes vs unrelated questions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from prism_lightning.model.generation import continuation_logprob, length_batches
from prism_lightning.model.row_routing import BASE, rows_on_adapters
from prism_lightning.utils.errors import PrismError
from prism_lightning.utils.jsonl import read_jsonl_numbered
from prism_lightning.utils.stats import wilson_interval

# Row name -> (context in the prompt, route): "gate" routes per row as PRISM does at inference.
ROWS: dict[str, tuple[bool, str]] = {
    "Base, no context": (False, "base"),
    "Base + context": (True, "base"),
    "PRISM, no context": (False, "gate"),
    "Adapter always on, no context": (False, "adapter"),
}


@dataclass(frozen=True)
class Probe:
    """A question; for ``probe`` rows its choices and the index of the right one (``unrelated`` rows have none)."""

    question: str
    kind: str
    choices: tuple[str, ...] = ()
    answer: int = -1


def load_probes(path: Path) -> list[Probe]:
    """Read a probes JSONL; a bad row is a one-line error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise PrismError(f"probes file not found: {path}")
    rows = read_jsonl_numbered(path)
    if not rows:
        raise PrismError(f"{path}: holds no probes")
    probes = []
    for line, row in rows:
        kind = row.get("kind", "probe")
        if not isinstance(row.get("question"), str) or not row["question"].strip():
            raise PrismError(f"{path}:{line}: expected a non-empty string \"question\"")
        if kind == "unrelated":
            probes.append(Probe(row["question"], kind))
            continue
        choices, answer = row.get("choices"), row.get("answer")
        if kind != "probe" or not isinstance(choices, list) or len(choices) < 2 \
                or not all(isinstance(c, str) and c for c in choices):
            raise PrismError(f"{path}:{line}: a probe needs \"kind\": \"probe\" and two or more string \"choices\"")
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise PrismError(f"{path}:{line}: \"answer\" must index \"choices\" (0..{len(choices) - 1})")
        probes.append(Probe(row["question"], kind, tuple(choices), answer))
    if not any(p.kind == "probe" for p in probes):
        raise PrismError(f"{path}: holds no rows of kind \"probe\"")
    return probes


def rate(hits: Sequence[bool]) -> dict:
    """Share of ``hits`` with n and a Wilson 95 % interval."""
    k, n = int(sum(hits)), len(hits)
    low, high = wilson_interval(k, n) if n else (0.0, 1.0)
    return {"rate": k / n if n else None, "k": k, "n": n, "ci95": [round(low, 4), round(high, 4)]}


@torch.no_grad()
def predicted_choices(gated: Any, prompts: Sequence[Sequence[int]], probes: Sequence[Probe], routes: Sequence[str],
                      batch_size: int = 16) -> list[int]:
    """Per probe, the choice with the highest summed log-likelihood as the reply's start (probe i's rows on adapter
    ``routes[i]``, ``__base__`` for none)."""
    tokenizer = gated.backbone.tokenizer
    pairs = [(i, j, tokenizer(c, add_special_tokens=False)["input_ids"])
             for i, p in enumerate(probes) for j, c in enumerate(p.choices)]
    sequences = [list(prompts[i]) + ids for i, _, ids in pairs]
    scores = torch.full((len(pairs),), float("-inf"))
    for index in length_batches(sequences, batch_size):
        with rows_on_adapters(gated.model, [routes[pairs[k][0]] for k in index], gated.adapters) as routed:
            scores[index] = continuation_logprob(gated.model, tokenizer.pad_token_id, gated.backbone.device,
                                                 [prompts[pairs[k][0]] for k in index],
                                                 [pairs[k][2] for k in index], **routed)
    # Pairs are in probe order, each probe's choices together: split the scores back per probe.
    per_probe = scores.split([len(p.choices) for p in probes])
    return [int(torch.argmax(s)) for s in per_probe]


def measure_fidelity(gated: Any, context: str, probes: Sequence[Probe], placement: Optional[str] = None,
                     batch_size: int = 16, adapter: Optional[str] = None) -> dict:
    """Probe accuracy per row (with intervals), chance, and the gate's opening rate on probes vs unrelated ones.

    ``adapter``: the adapter that distilled this context (K-way runs; default the first): the always-on row uses
    it, and the gate's routing counts as right on a probe only when it opens *that* adapter.
    """
    adapter = adapter or gated.adapters[0]
    asked = [p for p in probes if p.kind == "probe"]
    unrelated = [p for p in probes if p.kind == "unrelated"]
    plain = [gated.formatter.prompt_ids(p.question) for p in asked]
    with_context = [gated.formatter.prompt_ids(p.question, context, placement) for p in asked]
    gated_routes, _ = gated.routes(plain, "gate", batch_size) if asked else ([], None)
    opened = [r == adapter for r in gated_routes]
    rows = {}
    for name, (show_context, route) in ROWS.items():
        routes = gated_routes if route == "gate" else [adapter if route == "adapter" else BASE] * len(asked)
        picks = predicted_choices(gated, with_context if show_context else plain, asked, routes, batch_size)
        rows[name] = rate([pick == p.answer for pick, p in zip(picks, asked)])
    unrelated_routes = gated.routes([gated.formatter.prompt_ids(p.question) for p in unrelated], "gate",
                                    batch_size)[0] if unrelated else []
    return {
        "n_probes": len(asked), "chance": sum(1 / len(p.choices) for p in asked) / max(1, len(asked)),
        "threshold": float(gated.threshold), "rows": rows,
        "adapter": adapter,
        "routing": {"probe": rate(opened), "unrelated": rate([r != BASE for r in unrelated_routes])},
        "context_tokens": len(gated.formatter.prompt_ids("?", context, placement))
        - len(gated.formatter.prompt_ids("?")),
    }
