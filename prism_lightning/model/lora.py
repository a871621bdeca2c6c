"""LoRA on layers 1..L-1 through PEFT: the settings and the attachment (layer 0, the gate's input, never changes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from prism_lightning.model.adapters import DEFAULT_ADAPTER
from prism_lightning.model.backbone import Backbone

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyperparameters (paper: r 16, alpha 32, all seven projections; never on layer 0).

    Args:
        rank: LoRA rank.
        alpha: LoRA alpha.
        dropout: LoRA dropout.
        target_modules: projection names to adapt.
    """

    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))


def attach_lora(backbone: Backbone, settings: LoraSettings, adapters: Sequence[str] = (DEFAULT_ADAPTER,)) -> Any:
    """Wrap the backbone in PEFT with one LoRA adapter per name on layers 1..L-1, so layer 0 (the gate's input)
    never changes; every adapter is active and trainable (rows choose theirs through ``rows_on_adapters``)."""
    from peft import LoraConfig, get_peft_model  # lazy: peft imports transformers (heavy)

    n_layers = len(backbone.decoder_layers())
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules), layers_to_transform=list(range(1, n_layers)),
                        task_type="CAUSAL_LM", bias="none")

    def make(model: Any) -> Any:
        for p in model.parameters():
            p.requires_grad_(False)
        peft_model = get_peft_model(model, config, adapter_name=adapters[0])
        for name in adapters[1:]:
            peft_model.add_adapter(name, config)
        if len(adapters) > 1:
            peft_model.base_model.set_adapter(list(adapters))
        return peft_model
    return backbone.wrap(make)
