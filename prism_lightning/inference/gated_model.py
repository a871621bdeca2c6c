"""GatedModel: load an export and generate with per-row routing (adapter or untouched base) in one batch."""

from __future__ import annotations

import math
import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Optional, Sequence

import torch

from prism_lightning.inference.export import (
    GATE_FILE,
    adapter_dir,
    check_adapter_weights,
    check_export,
    export_adapters,
    read_safetensors,
)
from prism_lightning.model.adapters import DEFAULT_ADAPTER
from prism_lightning.model.backbone import BackboneConfig, check_base_model, load_backbone, release_backbone
from prism_lightning.model.chat import ChatFormatter
from prism_lightning.model.features import layer0_features
from prism_lightning.model.gate_mlp import GateMLP, open_logit
from prism_lightning.model.generation import (
    DecodingConfig,
    continuation_scores,
    generate_batch,
    left_pad,
    length_batches,
    next_token_logprobs,
    token_logprobs,
)
from prism_lightning.model.lm_head import base_model
from prism_lightning.model.row_routing import BASE, rows_on_adapters
from prism_lightning.utils.errors import PrismError

ROUTES = ("gate", "adapter", "base")


class GatedModel:
    """Base model + PRISM adapter(s) + gate; no persona prompt and no Lightning at inference.

    With K adapters the gate opens (calibrated probability of "some adapter" at or above the threshold) and then
    takes the adapter with the largest logit; K = 1 is binary PRISM.
    """

    def __init__(self, backbone, peft_model, gate: GateMLP, threshold: float, temperature: float,
                 adapters: Sequence[str] = (DEFAULT_ADAPTER,)) -> None:
        self.adapters = list(adapters)
        self.backbone = backbone
        self.model = peft_model
        self.gate = gate
        self.threshold = threshold
        self.temperature = temperature
        self.formatter = ChatFormatter(backbone.tokenizer)
        # A call's routes live on the shared LoRA modules (per-row scaling, disabled adapters) while it runs: one call
        # at a time, so two threads (or a server's requests) never run on each other's routes.
        self._lock = threading.RLock()
        self.gate_only = False
        self._lora_left = True

    def keep_gate_only(self) -> None:
        """Drop every decoder layer the gate does not read (it reads layer 0), freeing their memory: for a server
        whose generation runs in another engine (vLLM). Generating or scoring with this object is refused after."""
        decoder = base_model(self.model).get_decoder()
        decoder.layers = decoder.layers[:1]
        self.gate_only = True
        # PEFT refuses disable_adapter() on a model left without LoRA layers (the usual export spares layer 0).
        self._lora_left = any(hasattr(m, "lora_A") for m in decoder.layers[0].modules())
        release_backbone(self.backbone.config)  # nothing else in the process may pick up the cut model

    def _require_layers(self) -> None:
        if self.gate_only:
            raise PrismError("this GatedModel keeps only the gate's layers (its generation runs in vLLM)")

    @property
    def adapter_name(self) -> str:
        """The adapter of a one-adapter (binary) model; its first adapter otherwise."""
        return self.adapters[0]

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: Optional[str] = None) -> "GatedModel":
        """Load an export directory written by ``prism fit`` / ``prism export`` (one or K adapters)."""
        from peft import PeftModel  # lazy: peft imports transformers (heavy)

        directory = Path(directory)
        config = check_export(directory)
        bb_config = BackboneConfig(**{**config["backbone"], "device": device or "auto"})
        backbone = load_backbone(bb_config)
        check_base_model(config.get("base_model"), backbone, f"export {directory}")
        adapters = export_adapters(config)
        check_adapter_weights(directory, adapters)

        def load(model):
            peft_model = PeftModel.from_pretrained(model, str(adapter_dir(directory, adapters[0])),
                                                   adapter_name=adapters[0])
            for name in adapters[1:]:
                peft_model.load_adapter(str(adapter_dir(directory, name)), adapter_name=name)
            if len(adapters) > 1:  # every adapter active: each row picks its own in a forward
                peft_model.base_model.set_adapter(adapters, inference_mode=True)
            return peft_model

        peft_model = backbone.wrap(load)
        peft_model.eval()
        g = config["gate"]
        gate = GateMLP(g["hidden_size"], g["dims"], len(adapters), g.get("standardize", False))
        gate.load_state_dict(read_safetensors(directory / GATE_FILE))
        gate.eval().to(backbone.device)
        return cls(backbone, peft_model, gate, float(g["threshold"]), float(g["temperature"]), adapters)

    @torch.no_grad()
    def gate_outputs(self, prompt_ids: Sequence[Sequence[int]], batch_size: int = 16) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
        """Gate probabilities of routing to an adapter and the adapter each row would take (index), in input order:
        layer-0-only forwards on batches of at most ``batch_size`` prompts of similar length (a whole benchmark in
        one left-padded batch would not fit a 7B model's memory)."""
        probs = torch.empty(len(prompt_ids))
        choice = torch.zeros(len(prompt_ids), dtype=torch.long)
        pad = self.backbone.tokenizer.pad_token_id
        for index in length_batches(prompt_ids, batch_size):
            ids, mask = left_pad([prompt_ids[i] for i in index], pad, self.backbone.device)
            positions = torch.full((len(index),), ids.shape[1] - 1, device=ids.device)  # left padding: last column
            adapters_off = self.model.disable_adapter() if not self.gate_only or self._lora_left else nullcontext()
            with self._lock, adapters_off:
                features = layer0_features(self.model, ids, mask, positions)
            logits = self.gate.adapter_logits(features)
            probs[index] = torch.sigmoid(open_logit(logits) / self.temperature).float().cpu()
            choice[index] = logits.argmax(-1).cpu()
        return probs, choice

    def route(self, prompt_ids: Sequence[Sequence[int]], batch_size: int = 16) -> torch.Tensor:
        """Gate probabilities of routing to an adapter, in input order."""
        return self.gate_outputs(prompt_ids, batch_size)[0]

    def routes(self, prompt_ids: Sequence[Sequence[int]], route: str = "gate",
               batch_size: int = 16) -> tuple[list[str], torch.Tensor]:
        """PEFT adapter names per row (``__base__`` = untouched base) and the gate probabilities.

        ``route``: ``gate`` (PRISM), ``adapter`` (always on: the ungated baseline; with K adapters the gate's choice
        among them), ``base``, or an adapter's name (every row on it). A route that needs no gate runs no gate
        forward: its probabilities are NaN (reported as null).
        """
        if route not in ROUTES and route not in self.adapters:
            raise ValueError(f"route must be one of {ROUTES + tuple(self.adapters)}, got {route!r}")
        nan = torch.full((len(prompt_ids),), float("nan"))
        if route == "base":
            return [BASE] * len(prompt_ids), nan
        if route in self.adapters or (route == "adapter" and len(self.adapters) == 1):
            return [self.adapters[0] if route == "adapter" else route] * len(prompt_ids), nan
        probs, choice = self.gate_outputs(prompt_ids, batch_size)
        names = [self.adapters[c] for c in choice.tolist()]
        if route == "gate":
            names = [n if p >= self.threshold else BASE for n, p in zip(names, probs.tolist())]
        else:  # K-way ungated: the gate only picks which adapter
            probs = nan
        return names, probs

    def mixed_routes(self, prompt_ids: Sequence[Sequence[int]], requested: Sequence[str],
                     batch_size: int = 16) -> tuple[list[str], torch.Tensor]:
        """``routes`` with a route asked per row (a server's requests): rows asking the same route are routed
        together, so the gate runs once, on the rows that need it."""
        names: list[str] = [BASE] * len(prompt_ids)
        probs = torch.full((len(prompt_ids),), float("nan"))
        for route in dict.fromkeys(requested):
            index = [i for i, r in enumerate(requested) if r == route]
            got, p = self.routes([prompt_ids[i] for i in index], route, batch_size)
            for i, name in zip(index, got):
                names[i] = name
            probs[index] = p
        return names, probs

    @torch.no_grad()
    def generate_rows(self, prompt_ids: Sequence[Sequence[int]], names: Sequence[str], decoding: DecodingConfig,
                      seed: Optional[int] = None, **generate_kwargs) -> list[dict]:
        """One generate call, row ``b`` on PEFT adapter ``names[b]`` (``__base__``: the untouched base);
        ``generate_kwargs`` go to ``generate`` (a server's stopping criteria)."""
        self._require_layers()
        with self._lock, rows_on_adapters(self.model, names, self.adapters) as routed:
            return generate_batch(self.backbone, [list(p) for p in prompt_ids], decoding, seed=seed,
                                  model=self.model, **routed, **generate_kwargs)

    @torch.no_grad()
    def score_rows(self, prompt_ids: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                   names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward, row ``b`` on adapter ``names[b]``: summed log p(continuation | prompt) and whether greedy
        decoding would write the continuation ([n] each, CPU)."""
        self._require_layers()
        with self._lock, rows_on_adapters(self.model, names, self.adapters) as routed:
            return continuation_scores(self.model, self.backbone.tokenizer.pad_token_id, self.backbone.device,
                                       prompt_ids, continuations, **routed)

    @torch.no_grad()
    def next_token_rows(self, prompt_ids: Sequence[Sequence[int]], names: Sequence[str]) -> torch.Tensor:
        """One forward, row ``b`` on adapter ``names[b]``: log-softmax over the vocabulary after each prompt
        ([n, V], CPU)."""
        self._require_layers()
        with self._lock, rows_on_adapters(self.model, names, self.adapters) as routed:
            return next_token_logprobs(self.model, self.backbone.tokenizer.pad_token_id, self.backbone.device,
                                       prompt_ids, **routed)

    def route_fields(self, name: str, probability: float) -> dict:
        """How a row's route is reported: ``route`` (adapter|base), ``probability`` and, with K adapters, which."""
        return {"route": "base" if name == BASE else "adapter", "probability": reported(probability),
                **({"adapter": None if name == BASE else name} if len(self.adapters) > 1 else {})}

    def prompt_ids(self, prompt: str, persona: Optional[str] = None, history: Sequence[tuple[str, str]] = (),
                   placement: Optional[str] = None) -> list[int]:
        """Chat-formatted prompt ids (a persona only for the expert-prompting baseline, placed as ``placement``)."""
        return self.formatter.prompt_ids(prompt, persona, placement, history=history)

    @torch.no_grad()
    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], decoding: DecodingConfig = DecodingConfig(),
                     route: str = "gate") -> list[dict]:
        """Routed generation for tokenized prompts, in input order; batches of similar length, each a mixed batch."""
        self.backbone.check_fits(prompt_ids, decoding.max_new_tokens)
        out: list[Optional[dict]] = [None] * len(prompt_ids)
        for index in length_batches(prompt_ids, decoding.batch_size):
            chunk = [list(prompt_ids[i]) for i in index]
            names, probs = self.routes(chunk, route, decoding.batch_size)
            results = self.generate_rows(chunk, names, decoding, seed=decoding.seed + index[0])
            for i, r, p, n in zip(index, results, probs.tolist(), names):
                out[i] = {**r, **self.route_fields(n, p)}
        return out

    def generate(self, prompts: Sequence[str], decoding: DecodingConfig = DecodingConfig(),
                 route: str = "gate", persona: Optional[str] = None) -> list[dict]:
        """Generate for raw user prompts; each result has ``text``, ``probability`` and ``route``."""
        return self.generate_ids([self.prompt_ids(p, persona) for p in prompts], decoding, route)

    @torch.no_grad()
    def token_logprobs(self, prompt_ids: Sequence[Sequence[int]], tokens: Optional[Sequence[int]] = None,
                       route: str = "gate", batch_size: int = 16, tail: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs of ``tokens`` after the last ``tail`` positions of each prompt ([n, tail, k], CPU, input order)
        and the rows' gate probabilities ([n])."""
        self._require_layers()
        rows: list[Optional[torch.Tensor]] = [None] * len(prompt_ids)
        probs = torch.zeros(len(prompt_ids))
        for index in length_batches(prompt_ids, batch_size):
            chunk = [list(prompt_ids[i]) for i in index]
            names, p = self.routes(chunk, route, batch_size)
            with self._lock, rows_on_adapters(self.model, names, self.adapters) as routed:
                values = token_logprobs(self.model, self.backbone.tokenizer.pad_token_id, self.backbone.device,
                                        chunk, tokens, tail, **routed)
            probs[index] = p
            for i, v in zip(index, values):
                rows[i] = v
        return torch.stack(rows) if rows else torch.zeros(0, tail, len(tokens) if tokens is not None else len(self.backbone.tokenizer)), probs


def reported(probability: float) -> Optional[float]:
    """A gate probability as written to JSON: 4 decimals, or None where a fixed route ran no gate."""
    return None if math.isnan(probability) else round(float(probability), 4)
