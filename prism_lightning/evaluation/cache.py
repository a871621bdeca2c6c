"""Evaluation cache: each (route taken, prompt) is computed once across rows and suites.

PRISM's output for a prompt is by construction the Base output (gate closed) or the Ungated output (gate open)
of the same prompt, and a self-judge grades identical texts identically; so the gated row costs only its
layer-0 routing forward, and judge prompts repeated across rows are scored once.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from prism_lightning.inference.gated_model import BASE, reported
from prism_lightning.model.generation import DecodingConfig

# One work unit of the cache: about this many prompts per progress tick.
_CHUNK = 64


class CachedGatedModel:
    """A GatedModel front (``prompt_ids``, ``generate_ids``, ``token_logprobs``) that remembers results.

    Keys are the resolved route (``base`` or the adapter's name) plus everything that determines the result, so a hit
    is the same computation, never an approximation. ``on_progress(n)`` is told about computed prompts.
    """

    def __init__(self, model, on_progress: Optional[Callable[[int], None]] = None) -> None:
        self.model = model
        self.on_progress = on_progress or (lambda n: None)
        self._store: dict[tuple, object] = {}
        self.hits = 0
        self.misses = 0

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def _resolve(self, prompt_ids: Sequence[Sequence[int]], route: str,
                 batch_size: int) -> tuple[list[str], torch.Tensor]:
        names, probs = self.model.routes(prompt_ids, route, batch_size) if len(prompt_ids) else ([], torch.zeros(0))
        return ["base" if n == BASE else n for n in names], probs  # "base" or the adapter's name (K-way)

    def _fill(self, keys: list[tuple], prompt_ids: Sequence[Sequence[int]], taken: list[str],
              compute: Callable[[list[list[int]], str], list]) -> list:
        """Compute the missing keys per route, in chunks, then return every key's value in order."""
        for route in ["base", *sorted(set(taken) - {"base"})]:
            missing = list({k: i for i, k in enumerate(keys) if taken[i] == route and k not in self._store}.values())
            self.hits += sum(1 for i, k in enumerate(keys) if taken[i] == route) - len(missing)
            # Longest first inside a chunk is the model's job; chunks keep progress moving.
            missing.sort(key=lambda i: len(prompt_ids[i]), reverse=True)
            for start in range(0, len(missing), _CHUNK):
                index = missing[start:start + _CHUNK]
                for i, value in zip(index, compute([list(prompt_ids[i]) for i in index], route)):
                    self._store[keys[i]] = value
                self.misses += len(index)
                self.on_progress(len(index))
        return [self._store[k] for k in keys]

    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], decoding: DecodingConfig = DecodingConfig(),
                     route: str = "gate") -> list[dict]:
        """Routed generation (see ``GatedModel.generate_ids``), each (route, prompt, decoding) generated once."""
        taken, probs = self._resolve(prompt_ids, route, decoding.batch_size)
        keys = [("generate", t, decoding, tuple(ids)) for t, ids in zip(taken, prompt_ids)]

        def compute(ids: list[list[int]], forced: str) -> list[dict]:
            return [{k: v for k, v in r.items() if k not in ("probability", "route")}
                    for r in self.model.generate_ids(ids, decoding, forced)]

        values = self._fill(keys, prompt_ids, taken, compute)
        k_way = len(getattr(self.model, "adapters", ())) > 1  # the study's base-only front has no adapters
        return [{**v, "probability": reported(p), "route": "base" if t == "base" else "adapter",
                 **({"adapter": None if t == "base" else t} if k_way else {})}
                for v, p, t in zip(values, probs.tolist(), taken)]

    def token_logprobs(self, prompt_ids: Sequence[Sequence[int]], tokens: Optional[Sequence[int]] = None,
                       route: str = "gate", batch_size: int = 16, tail: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Routed token log-probs (see ``GatedModel.token_logprobs``), each (route, prompt, tokens, tail) once."""
        taken, probs = self._resolve(prompt_ids, route, batch_size)
        columns = tuple(tokens) if tokens is not None else None
        keys = [("logprobs", t, columns, tail, tuple(ids)) for t, ids in zip(taken, prompt_ids)]

        def compute(ids: list[list[int]], forced: str) -> list[torch.Tensor]:
            return list(self.model.token_logprobs(ids, tokens, forced, batch_size, tail)[0])

        values = self._fill(keys, prompt_ids, taken, compute)
        width = len(columns) if columns is not None else len(self.model.backbone.tokenizer)
        return (torch.stack(values) if values else torch.zeros(0, tail, width)), probs
