"""GatedModel: load an export and generate with per-row routing (adapter or untouched base) in one batch."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors.torch import load_file

from prism_lightning.backbone import BackboneConfig, load_backbone
from prism_lightning.chat import ChatFormatter
from prism_lightning.export import ADAPTER_DIR, GATE_FILE, check_export
from prism_lightning.features import layer0_features
from prism_lightning.generation import DecodingConfig, generate_batch, left_pad
from prism_lightning.modules.gate import GateMLP
from prism_lightning.modules.student import check_base_model

ADAPTER = "prism"
BASE = "__base__"  # PEFT's name for "no adapter" in mixed batches


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
        peft_model = backbone.wrap(
            lambda model: PeftModel.from_pretrained(model, str(directory / ADAPTER_DIR), adapter_name=ADAPTER))
        peft_model.eval()
        g = config["gate"]
        gate = GateMLP(g["hidden_size"], g["dims"])
        gate.load_state_dict(load_file(directory / GATE_FILE))
        gate.eval().to(backbone.device)
        return cls(backbone, peft_model, gate, float(g["threshold"]), float(g["temperature"]))

    @torch.no_grad()
    def route(self, prompt_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Gate probabilities for tokenized prompts (a forward that stops after layer 0)."""
        ids, mask = left_pad(prompt_ids, self.backbone.tokenizer.pad_token_id, self.backbone.device)
        positions = torch.full((len(prompt_ids),), ids.shape[1] - 1, device=ids.device)  # left padding: last column
        with self.model.disable_adapter():
            features = layer0_features(self.model, ids, mask, positions)
        return torch.sigmoid(self.gate(features) / self.temperature).cpu()

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], decoding: DecodingConfig = DecodingConfig(),
                 route: str = "gate") -> list[dict]:
        """Generate for raw user prompts; each result has ``text``, ``probability`` and ``route``.

        ``route``: ``gate`` (PRISM), ``adapter`` (always on, the ungated baseline) or ``base``.
        """
        out: list[dict] = []
        for start in range(0, len(prompts), decoding.batch_size):
            chunk = [self.formatter.prompt_ids(p) for p in prompts[start:start + decoding.batch_size]]
            probs = self.route(chunk)
            use = probs >= self.threshold if route == "gate" else torch.full_like(probs, route == "adapter",
                                                                                 dtype=torch.bool)
            names = [self.adapter_name if u else BASE for u in use.tolist()]
            results = generate_batch(self.backbone, chunk, decoding, seed=decoding.seed + start,
                                     adapter_names=names, model=self.model)
            out += [{**r, "probability": round(float(p), 4), "route": "base" if n == BASE else "adapter"}
                    for r, p, n in zip(results, probs.tolist(), names)]
        return out
