"""One batch, each row on the adapter or on the base: the LoRA delta scaled per row by 1 or 0.

PEFT's own mixed batches (``adapter_names``) gather and scatter the sub-batches in every LoRA module at every
decode step (measured +27–31% over a base batch on 2 cores); multiplying each row's LoRA delta by 0 or 1 costs one
broadcast multiply per module on top of the all-adapter batch, and a batch wholly on one side takes the plain path
(adapter on, or disabled: the base's cost).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch


def lora_layers(model: Any, adapter: str) -> list[Any]:
    """The LoRA modules of ``model`` that carry ``adapter`` as plain (variant-free) LoRA."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer) and adapter in m.scaling
            and adapter not in getattr(m, "lora_variant", {})]


@contextmanager
def rows_on_adapter(model: Any, adapter: str, use: Sequence[bool]) -> Iterator[dict]:
    """Inside the block, row ``b`` of every forward of ``model`` uses ``adapter`` iff ``use[b]``.

    Yields the keyword arguments to add to ``generate``/forward (empty, or PEFT's ``adapter_names`` when a LoRA
    variant such as DoRA cannot be scaled per row). The batch keeps its rows throughout (greedy or sampled
    ``generate`` with one beam does), so a [B, 1, 1] factor broadcasts over prefill and decode steps alike.
    """
    use = list(use)
    if all(use):
        yield {}
        return
    if not any(use):
        with model.disable_adapter():
            yield {}
        return
    layers = lora_layers(model, adapter)
    every = [m for m in model.modules() if hasattr(m, "lora_A") and adapter in getattr(m, "lora_A", {})]
    if len(layers) != len(every):  # a LoRA variant: let PEFT route the sub-batches
        yield {"adapter_names": [adapter if u else "__base__" for u in use]}
        return
    saved = [m.scaling[adapter] for m in layers]
    try:
        for module, scaling in zip(layers, saved):
            weight = module.lora_B[adapter].weight
            factor = torch.tensor(use, dtype=weight.dtype, device=weight.device).view(-1, 1, 1)
            module.scaling[adapter] = factor * scaling
        yield {}
    finally:
        for module, scaling in zip(layers, saved):
            module.scaling[adapter] = scaling
