"""Teacher forwards that reuse the keys and values of a shared prompt prefix (the persona block).

The online teacher is the frozen base given the persona. Every distill item of a persona starts with the same
tokens (template header + persona text), so their per-layer keys and values never change during a run: they are
computed once per process and each step runs the decoder only on the tokens after them. The hidden states equal
the full forward's (tested); only the persona's share of the teacher's compute goes away.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional, Sequence

import torch
from transformers import DynamicCache

from prism_lightning.model.lm_head import base_model

KeyValues = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [1, heads, P, head_dim]


def shared_prefix_len(ids: Sequence[int], prefix: Sequence[int], limit: int) -> int:
    """How many leading tokens ``ids`` shares with ``prefix``, at most ``limit``."""
    n = 0
    for a, b in zip(ids[:limit], prefix):
        if a != b:
            break
        n += 1
    return n


class PrefixStates:
    """Per-process store of the decoder's keys and values on prompt prefixes, least recently used dropped first.

    Valid only for weights that never change while it lives: the caller runs it with the adapter disabled.
    """

    def __init__(self, limit: int = 16) -> None:
        self.limit = limit
        self._states: OrderedDict[tuple[int, ...], KeyValues] = OrderedDict()
        # Set once a forward shows a sliding-window cache: no prefix of this model can be reused, so no later step
        # runs the prefix forward only to throw it away.
        self.unsupported = False

    def __len__(self) -> int:
        return len(self._states)

    def clear(self) -> None:
        """Forget every prefix (e.g. after the weights moved to another device)."""
        self._states.clear()
        self.unsupported = False

    def key_values(self, model: Any, prefix: tuple[int, ...], device: torch.device) -> Optional[KeyValues]:
        """Keys and values of ``prefix``, computed on first use; None when the model's cache is not full attention."""
        if self.unsupported:
            return None
        states = self._states.get(prefix)
        if states is not None and states[0][0].device == device:
            self._states.move_to_end(prefix)
            return states
        ids = torch.tensor([prefix], device=device)
        out = base_model(model).get_decoder()(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        cache = out.cache
        if cache is None or any(getattr(cache, "is_sliding", [False])):
            self.unsupported = True  # sliding-window layers keep only part of the prefix: full forwards instead
            return None
        states = [(layer.keys, layer.values) for layer in cache.layers]
        self._states[prefix] = states
        if len(self._states) > self.limit:
            self._states.popitem(last=False)
        return states


def hidden_after_prefixes(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          prefix_lens: torch.Tensor, store: PrefixStates) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Last hidden states of the tokens after each row's prefix ([B, R, H]) and the prefix lengths ([B]).

    ``input_ids`` are right-padded; row b's first ``prefix_lens[b]`` tokens are its prefix (0 = none). The hidden
    state of token t of row b is at ``[b, t - prefix_lens[b]]``. Rows' prefixes are left-padded to the longest, so
    every row's own tokens start at the same cache slot; padding is masked out. None when the model cannot reuse
    a prefix (sliding-window attention): the caller runs the full forward.
    """
    device = input_ids.device
    lens = [int(n) for n in prefix_lens]
    keys_of = [tuple(input_ids[b, :n].tolist()) for b, n in enumerate(lens)]
    states: dict[tuple[int, ...], KeyValues] = {}
    for key in keys_of:
        if key and key not in states:
            found = store.key_values(model, key, device)
            if found is None:
                return None
            states[key] = found
    rows, width = input_ids.shape[0], max(lens)
    lengths = attention_mask.sum(1).tolist()
    rest = max(int(length) - n for length, n in zip(lengths, lens))
    ids = input_ids.new_zeros(rows, rest)
    rest_mask = attention_mask.new_zeros(rows, rest)
    prefix_mask = attention_mask.new_zeros(rows, width)
    for b, n in enumerate(lens):
        own = int(lengths[b]) - n
        ids[b, :own], rest_mask[b, :own] = input_ids[b, n:n + own], 1
        prefix_mask[b, width - n:] = 1
    layers = []
    if width:
        template = next(iter(states.values()))
        for layer, (k0, v0) in enumerate(template):
            keys = k0.new_zeros(rows, k0.shape[1], width, k0.shape[3])
            values = v0.new_zeros(rows, v0.shape[1], width, v0.shape[3])
            for b, n in enumerate(lens):
                if n:
                    k, v = states[keys_of[b]][layer]
                    keys[b, :, width - n:], values[b, :, width - n:] = k[0], v[0]
            layers.append((keys, values))
    positions = torch.tensor(lens, device=device)[:, None] + torch.arange(rest, device=device)
    decoder = base_model(model).get_decoder()
    out = decoder(input_ids=ids, attention_mask=torch.cat([prefix_mask, rest_mask], 1), position_ids=positions,
                  cache=DynamicCache(layers) if layers else None, use_cache=bool(layers))
    return out.last_hidden_state, torch.tensor(lens, device=device)
