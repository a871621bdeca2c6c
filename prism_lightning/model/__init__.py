"""The base model and what runs on it: loading, chat formatting, layer-0 features, the gate network, LoRA adapters
and per-row routing, generation, choice reading, persona-prefix reuse. No Lightning, no training code."""
