"""Batched generation: left padding, KV cache, every decoding parameter explicit, results appended to JSONL."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
from transformers import GenerationConfig

from prism_lightning.distributed.sharding import run_stage, stage_progress, todo_batches
from prism_lightning.model.backbone import Backbone
from prism_lightning.model.lm_head import base_model
from prism_lightning.utils.jsonl import JsonlSink


@dataclass(frozen=True)
class DecodingConfig:
    """Decoding parameters, all pinned; the model's own generation defaults are never consulted.

    Args:
        max_new_tokens: cap on generated tokens.
        temperature: 0 means greedy decoding.
        top_p: nucleus mass (1.0 = off).
        top_k: top-k cut (0 = off).
        repetition_penalty: 1.0 = off.
        seed: base seed; each batch is seeded from it and its first item id.
        batch_size: prompts per generate call.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0
    batch_size: int = 16

    def generation_config(self, tokenizer: Any, eos_ids: Sequence[int]) -> GenerationConfig:
        """A complete GenerationConfig with nothing left to model defaults."""
        sample = self.temperature > 0
        # Greedy decoding gets no sampling knobs at all (transformers flags them as unused otherwise).
        return GenerationConfig(
            do_sample=sample, temperature=self.temperature if sample else None,
            top_p=self.top_p if sample else None, top_k=self.top_k if sample else None,
            repetition_penalty=self.repetition_penalty, max_new_tokens=self.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=list(eos_ids), num_beams=1, use_cache=True)


def stop_token_ids(backbone: Backbone) -> list[int]:
    """End-of-turn ids: the tokenizer's EOS plus any the model declares (Llama-3 has several)."""
    ids = {backbone.tokenizer.eos_token_id}
    declared = getattr(backbone.model.generation_config, "eos_token_id", None)
    ids.update(declared if isinstance(declared, (list, tuple)) else [declared])
    return sorted(i for i in ids if i is not None)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor,
                                                                                            torch.Tensor]:
    """Left-pad token id lists into (input_ids, attention_mask), so every row ends at the last column."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int,
              device: torch.device = torch.device("cpu")) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into (input_ids, attention_mask): each row keeps the positions it has alone (the
    training layout; causal attention never reads the padding after a row's tokens)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, :len(seq)] = 1
    return ids.to(device), mask.to(device)


def length_batches(sequences: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first, so left padding wastes little compute."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]), reverse=True)
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


@torch.no_grad()
def token_logprobs(model: Any, pad_id: int, device: torch.device, prompts: Sequence[Sequence[int]],
                   tokens: Optional[Sequence[int]] = None, tail: int = 1, **forward_kwargs: Any) -> torch.Tensor:
    """Log-probs after each of the last ``tail`` positions of one left-padded batch ([n, tail, k], fp32, CPU).

    ``tokens`` picks k vocabulary columns (None keeps all); ``tail=2`` reads a prompt's next token and the token
    after an appended one in a single forward.
    """
    ids, mask = left_pad(prompts, pad_id, device)
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=tail, **forward_kwargs).logits[:, -tail:]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return (logprobs if tokens is None else logprobs[..., list(tokens)]).cpu()


@torch.no_grad()
def continuation_scores(model: Any, pad_id: int, device: torch.device, prompts: Sequence[Sequence[int]],
                        continuations: Sequence[Sequence[int]], **forward_kwargs: Any) -> tuple[torch.Tensor,
                                                                                                torch.Tensor]:
    """Summed log p(continuation | prompt) per row of one left-padded batch and whether greedy decoding would write
    the continuation ([n] fp32 and [n] bool, CPU).

    Rows end with their continuation, so the logits of the last (longest continuation + 1) positions hold every
    row's: no full-sequence, full-vocabulary logits. Each prompt must be non-empty.
    """
    longest = max(len(c) for c in continuations)
    if longest == 0:
        return torch.zeros(len(prompts)), torch.ones(len(prompts), dtype=torch.bool)
    ids, mask = left_pad([list(p) + list(c) for p, c in zip(prompts, continuations)], pad_id, device)
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=longest + 1,
                   **forward_kwargs).logits[:, -longest - 1:-1].float()
    target = ids[:, -longest:]
    picked = torch.log_softmax(logits, dim=-1).gather(-1, target[..., None])[..., 0]
    lengths = torch.tensor([len(c) for c in continuations], device=picked.device)
    keep = torch.arange(longest, device=picked.device)[None] >= (longest - lengths)[:, None]
    greedy = ((logits.argmax(-1) == target) | ~keep).all(-1)
    return (picked * keep).sum(-1).cpu(), greedy.cpu()


def continuation_logprob(model: Any, pad_id: int, device: torch.device, prompts: Sequence[Sequence[int]],
                         continuations: Sequence[Sequence[int]], **forward_kwargs: Any) -> torch.Tensor:
    """Summed log p(continuation | prompt) per row of one left-padded batch ([n], fp32, CPU)."""
    return continuation_scores(model, pad_id, device, prompts, continuations, **forward_kwargs)[0]


def next_token_logprobs(model: Any, pad_id: int, device: torch.device, prompts: Sequence[Sequence[int]],
                        **forward_kwargs: Any) -> torch.Tensor:
    """Log-softmax over the vocabulary after each prompt of one left-padded batch ([n, V], fp32, CPU)."""
    return token_logprobs(model, pad_id, device, prompts, **forward_kwargs)[:, -1]


@torch.no_grad()
def generate_batch(backbone: Backbone, prompts: Sequence[Sequence[int]], decoding: DecodingConfig,
                   seed: Optional[int] = None, model: Any = None, **generate_kwargs: Any) -> list[dict]:
    """Generate for one batch of tokenized prompts; returns ``{"text", "new_tokens", "finished"}`` per row.

    ``model`` defaults to the backbone's; pass a PEFT wrapper (with ``adapter_names``) for routed generation.
    """
    model = model if model is not None else backbone.model
    tokenizer = backbone.tokenizer
    core = base_model(model)
    eos = stop_token_ids(backbone)
    config = decoding.generation_config(tokenizer, eos)
    ids, mask = left_pad(prompts, tokenizer.pad_token_id, backbone.device)
    saved = core.generation_config
    core.generation_config = config  # nothing from the model's generation_config.json can leak in
    # The batch's seed applies inside a forked random state: a bootstrap run in the same process as training
    # must leave training's random stream (LoRA dropout) exactly as if it had not run.
    devices = [backbone.device] if backbone.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, **generate_kwargs)
    finally:
        core.generation_config = saved
    results = []
    for row in out[:, ids.shape[1]:].tolist():
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        body = row if stop is None else row[:stop]
        results.append({"text": tokenizer.decode(body, skip_special_tokens=True).strip(),
                        "new_tokens": len(body), "finished": stop is not None})
    return results


class Engine(Protocol):
    """Another generation engine (vLLM): many prompts per call, a seed per prompt."""

    batches_per_call: int

    def generate(self, prompts: Sequence[Sequence[int]], decoding: DecodingConfig,
                 seeds: Sequence[int]) -> list[dict]:
        """``generate_batch``'s result per prompt."""


def generate_into(backbone: Backbone, items: Sequence[dict], decoding: DecodingConfig, sink: JsonlSink,
                  description: str, make_record: Callable[[dict, dict], dict],
                  engine: Optional[Engine] = None) -> None:
    """Generate for every item (``{"id", "prompt_ids", ...}``) not yet in ``sink``, appending each batch atomically.

    Items are sorted by prompt length so batches waste little padding; ``make_record(item, result)``
    turns a generation into the stored record. The batches are planned over all items, finished or not, so a
    resumed or sharded run (a ``ShardedSink``: this rank's batches only) generates exactly the batches, and with
    their seeds the texts, of one uninterrupted process.
    """
    batches = todo_batches(items, decoding.batch_size, sink)

    def work() -> None:
        if not batches:
            return
        with stage_progress(sum(map(len, batches)), description, sink) as advance:
            if engine is not None:
                run_on_engine(engine, batches, decoding, sink, make_record, advance)
                return
            for batch in batches:
                seed = decoding.seed + zlib.crc32(batch[0]["id"].encode())
                results = generate_batch(backbone, [i["prompt_ids"] for i in batch], decoding, seed=seed)
                sink.append([make_record(item, result) for item, result in zip(batch, results)])
                advance(len(batch))

    run_stage(work, items, decoding.batch_size, sink)


def append_grouped(batches: list[list[dict]], per_call: int, score: Callable[[list[dict]], list[dict]],
                   sink: JsonlSink, advance: Callable[[int], None]) -> None:
    """``score`` the planned batches ``per_call`` at a time (what one engine call takes), then append each batch's
    records on its own, as one batch per call would: a resumed run sees the same batches."""
    for start in range(0, len(batches), per_call):
        group = batches[start:start + per_call]
        records = iter(score([item for batch in group for item in batch]))
        for batch in group:
            sink.append([next(records) for _ in batch])
            advance(len(batch))


def run_on_engine(engine: Engine, batches: list[list[dict]], decoding: DecodingConfig, sink: JsonlSink,
                  make_record: Callable[[dict, dict], dict], advance: Callable[[int], None]) -> None:
    """The planned batches on another engine, several per call; each item seeded from its own id (its text does
    not depend on its batch-mates), each batch appended as it would be on the HF path."""
    def score(flat: list[dict]) -> list[dict]:
        results = engine.generate([i["prompt_ids"] for i in flat], decoding,
                                  [decoding.seed + zlib.crc32(i["id"].encode()) for i in flat])
        return [make_record(item, result) for item, result in zip(flat, results)]

    append_grouped(batches, engine.batches_per_call, score, sink, advance)
