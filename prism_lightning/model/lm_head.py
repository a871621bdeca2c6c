"""The decoder's hidden states and the LM head applied apart, so logits exist only where a loss reads them."""

from __future__ import annotations

from typing import Any

import torch


def base_model(model: Any) -> Any:
    """The transformers causal LM under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_hidden(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states [B, T, H] (LoRA layers, if injected and enabled, take part)."""
    decoder = base_model(model).get_decoder()
    return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def head_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on hidden states [..., H], with the final logit scaling or soft cap the model declares."""
    base = base_model(model)
    logits = base.get_output_embeddings()(hidden)
    config = base.config
    if getattr(config, "logit_scale", None):  # Cohere
        logits = logits * config.logit_scale
    if getattr(config, "final_logit_softcapping", None):  # Gemma 2
        cap = config.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    return logits
