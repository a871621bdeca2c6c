"""Layer-0 features for the gate, read by a forward hook on the first decoder layer (one definition for all uses)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch

from prism_lightning.model.lm_head import base_model


class _StopAfterLayer0(Exception):
    """Raised inside the hook to skip layers 1..L-1 when only the features are needed."""


def first_decoder_layer(model: Any) -> torch.nn.Module:
    """Decoder layer 0 of a transformers causal LM, PEFT-wrapped or not."""
    return base_model(model).get_decoder().layers[0]


@contextmanager
def capture_layer0(model: Any, stop: bool = False) -> Iterator[dict]:
    """Record layer 0's output hidden states in ``box["hidden"]``; with ``stop`` the forward ends right there."""
    box: dict[str, Optional[torch.Tensor]] = {"hidden": None}

    def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        box["hidden"] = output[0] if isinstance(output, tuple) else output
        if stop:
            raise _StopAfterLayer0

    handle = first_decoder_layer(model).register_forward_hook(hook)
    try:
        yield box
    except _StopAfterLayer0:
        pass
    finally:
        handle.remove()


def gather_positions(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows of ``hidden`` [B, T, H] at one position per batch row -> [B, H] in fp32."""
    index = positions.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
    return hidden.gather(1, index).squeeze(1).float()


def layer0_features(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    positions: torch.Tensor) -> torch.Tensor:
    """Gate features: layer-0 output at ``positions``, computed by a forward that stops after layer 0."""
    with capture_layer0(model, stop=True) as box:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return gather_positions(box["hidden"], positions)
