"""GatedModel: load an export and generate with per-row routing (adapter or untouched base) in one batch."""

from __future__ import annotations

import math

from pathlib import Path
from typing import Optional, Sequence

import torch

from prism_lightning.backbone import BackboneConfig, check_base_model, load_backbone
from prism_lightning.chat import ChatFormatter
from prism_lightning.export import ADAPTER_DIR, GATE_FILE, check_adapter_weights, check_export, read_safetensors
from prism_lightning.features import layer0_features
from prism_lightning.generation import DecodingConfig, generate_batch, left_pad, length_batches, token_logprobs
from prism_lightning.gate_mlp import GateMLP
from prism_lightning.row_routing import rows_on_adapter

ADAPTER = "prism"
BASE = "__base__"  # PEFT's name for "no adapter" in mixed batches
ROUTES = ("gate", "adapter", "base")


class GatedModel:
    """Base model + PRISM adapter + gate; no persona prompt and no Lightning at inference."""

    def __init__(self, backbone, peft_model, gate: GateMLP, threshold: float, temperature: float,
                 adapter_name: str = ADAPTER) -> None:
        self.adapter_name = adapter_name
        self.backbone = backbone
        self.model = peft_model
        self.gate = gate
        self.threshold = threshold
        self.temperature = temperature
        self.formatter = ChatFormatter(backbone.tokenizer)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: Optional[str] = None) -> "GatedModel":
        """Load an export directory written by ``prism fit`` / ``prism export``."""
        from peft import PeftModel

        directory = Path(directory)
        config = check_export(directory)
        bb_config = BackboneConfig(**{**config["backbone"], "device": device or "auto"})
        backbone = load_backbone(bb_config)
        check_base_model(config.get("base_model"), backbone, f"export {directory}")
        check_adapter_weights(directory)
        peft_model = backbone.wrap(
            lambda model: PeftModel.from_pretrained(model, str(directory / ADAPTER_DIR), adapter_name=ADAPTER))
        peft_model.eval()
        g = config["gate"]
        gate = GateMLP(g["hidden_size"], g["dims"])
        gate.load_state_dict(read_safetensors(directory / GATE_FILE))
        gate.eval().to(backbone.device)
        return cls(backbone, peft_model, gate, float(g["threshold"]), float(g["temperature"]))

    @torch.no_grad()
    def route(self, prompt_ids: Sequence[Sequence[int]], batch_size: int = 16) -> torch.Tensor:
        """Gate probabilities for tokenized prompts, in input order: layer-0-only forwards on batches of at most
        ``batch_size`` prompts of similar length (a whole benchmark in one left-padded batch would not fit a 7B
        model's memory)."""
        probs = torch.empty(len(prompt_ids))
        pad = self.backbone.tokenizer.pad_token_id
        for index in length_batches(prompt_ids, batch_size):
            ids, mask = left_pad([prompt_ids[i] for i in index], pad, self.backbone.device)
            positions = torch.full((len(index),), ids.shape[1] - 1, device=ids.device)  # left padding: last column
            with self.model.disable_adapter():
                features = layer0_features(self.model, ids, mask, positions)
            probs[index] = torch.sigmoid(self.gate(features) / self.temperature).float().cpu()
        return probs

    def routes(self, prompt_ids: Sequence[Sequence[int]], route: str = "gate",
               batch_size: int = 16) -> tuple[list[str], torch.Tensor]:
        """PEFT adapter names per row (``__base__`` = untouched base) and the gate probabilities.

        ``route``: ``gate`` (PRISM), ``adapter`` (always on: the ungated baseline) or ``base``. A fixed route runs
        no gate forward: its probabilities are NaN (reported as null).
        """
        if route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
        if route == "gate":
            probs = self.route(prompt_ids, batch_size)
            use = (probs >= self.threshold).tolist()
        else:
            probs = torch.full((len(prompt_ids),), float("nan"))
            use = [route == "adapter"] * len(prompt_ids)
        return [self.adapter_name if u else BASE for u in use], probs

    def prompt_ids(self, prompt: str, persona: Optional[str] = None, history: Sequence[tuple[str, str]] = (),
                   placement: Optional[str] = None) -> list[int]:
        """Chat-formatted prompt ids (a persona only for the expert-prompting baseline, placed as ``placement``)."""
        return self.formatter.prompt_ids(prompt, persona, placement, history=history)

    @torch.no_grad()
    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], decoding: DecodingConfig = DecodingConfig(),
                     route: str = "gate") -> list[dict]:
        """Routed generation for tokenized prompts, in input order; batches of similar length, each a mixed batch."""
        out: list[Optional[dict]] = [None] * len(prompt_ids)
        for index in length_batches(prompt_ids, decoding.batch_size):
            chunk = [list(prompt_ids[i]) for i in index]
            names, probs = self.routes(chunk, route, decoding.batch_size)
            with rows_on_adapter(self.model, self.adapter_name, [n != BASE for n in names]) as routed:
                results = generate_batch(self.backbone, chunk, decoding, seed=decoding.seed + index[0],
                                         model=self.model, **routed)
            for i, r, p, n in zip(index, results, probs.tolist(), names):
                out[i] = {**r, "probability": reported(p), "route": "base" if n == BASE else "adapter"}
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
        rows: list[Optional[torch.Tensor]] = [None] * len(prompt_ids)
        probs = torch.zeros(len(prompt_ids))
        for index in length_batches(prompt_ids, batch_size):
            chunk = [list(prompt_ids[i]) for i in index]
            names, p = self.routes(chunk, route, batch_size)
            with rows_on_adapter(self.model, self.adapter_name, [n != BASE for n in names]) as routed:
                values = token_logprobs(self.model, self.backbone.tokenizer.pad_token_id, self.backbone.device,
                                        chunk, tokens, tail, **routed)
            probs[index] = p
            for i, v in zip(index, values):
                rows[i] = v
        return torch.stack(rows) if rows else torch.zeros(0, tail, len(tokens) if tokens is not None else len(self.backbone.tokenizer)), probs


def reported(probability: float) -> Optional[float]:
    """A gate probability as written to JSON: 4 decimals, or None where a fixed route ran no gate."""
    return None if math.isnan(probability) else round(float(probability), 4)
