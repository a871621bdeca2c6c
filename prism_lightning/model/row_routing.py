"""One batch, each row on its adapter or on the base: each adapter's LoRA delta scaled per row by 1 or 0.

PEFT's own mixed batches (``adapter_names``) gather and scatter the sub-batches in every LoRA module at every
decode step (measured +27–31% over a base batch on 2 cores); multiplying each row's LoRA delta by 0 or 1 costs one
broadcast multiply per module on top of the all-adapter batch, and a batch wholly on one side takes the plain path
(adapter on, or disabled: the base's cost).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

BASE = "__base__"  # PEFT's name for "no adapter" in mixed batches

def lora_layers(model: Any, adapter: str) -> list[Any]:
    """The LoRA modules of ``model`` that carry ``adapter`` as plain (variant-free) LoRA."""
    from peft.tuners.lora import LoraLayer  # lazy: peft imports transformers (heavy)

    return [m for m in model.modules() if isinstance(m, LoraLayer) and adapter in m.scaling
            and adapter not in getattr(m, "lora_variant", {})]


@contextmanager
def rows_on_adapters(model: Any, routes: Sequence[str], adapters: Sequence[str]) -> Iterator[dict]:
    """Inside the block, row ``b`` of every forward of ``model`` uses adapter ``routes[b]`` (``__base__``: none).

    ``adapters`` are the model's active adapters (all K of a K-way model). Yields the keyword arguments to add to
    ``generate``/forward (empty, or PEFT's ``adapter_names`` when a LoRA variant such as DoRA cannot be scaled per
    row). The batch keeps its rows throughout (greedy or sampled ``generate`` with one beam does), so a [B, 1, 1]
    factor per adapter broadcasts over prefill and decode steps alike. Works in training too: a row's loss reaches
    only its own adapter's weights.
    """
    routes = list(routes)
    if all(r == BASE for r in routes):
        with model.disable_adapter():
            yield {}
        return
    if len(adapters) == 1 and all(r == adapters[0] for r in routes):
        yield {}
        return
    layers = {a: lora_layers(model, a) for a in adapters}
    every = {a: [m for m in model.modules() if hasattr(m, "lora_A") and a in getattr(m, "lora_A", {})]
             for a in adapters}
    if any(len(layers[a]) != len(every[a]) for a in adapters):  # a LoRA variant: let PEFT route the sub-batches
        yield {"adapter_names": routes}
        return
    saved = [(module, a, module.scaling[a]) for a in adapters for module in layers[a]]
    try:
        for module, a, scaling in saved:
            weight = module.lora_B[a].weight
            factor = torch.tensor([r == a for r in routes], dtype=weight.dtype, device=weight.device).view(-1, 1, 1)
            module.scaling[a] = factor * scaling
        yield {}
    finally:
        for module, a, scaling in saved:
            module.scaling[a] = scaling


@contextmanager
def rows_on_adapter(model: Any, adapter: str, use: Sequence[bool]) -> Iterator[dict]:
    """The one-adapter case of ``rows_on_adapters``: row ``b`` on ``adapter`` iff ``use[b]``."""
    with rows_on_adapters(model, [adapter if u else BASE for u in use], [adapter]) as routed:
        yield routed
