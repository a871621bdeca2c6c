"""What folding a context into a gated adapter saves: time to first token (TTFT) and decode tokens/s with the
context prepended vs the gated adapter without it, across context lengths, batch 1 and 16, on the embedded model.

    PRISM_CACHE_DIR=/tmp/prismcache python bench/context_latency.py            # 256 / 1k / 4k tokens
    PRISM_CACHE_DIR=/tmp/prismcache python bench/context_latency.py --quick    # a smoke run (tests use it)

Three ways to serve one request (greedy, ``--new`` tokens after the first):

- ``prepended``: the context block (a memory of numbered facts, cut to the length) in the system turn, the
  whole prompt prefilled per request — what a deployment without prefix caching pays;
- ``prefix-cached``: the same prompt, with the context's keys/values computed once, outside the timing, and each
  request prefilling only its own tokens on top (the cache rolled back after each request) — the fair baseline for
  a server with prefix caching;
- ``gated adapter``: no context; the gate's layer-0 forward on the prompt, then prefill and decode with the LoRA
  adapter on (rank 16 on every projection, random weights: the full LoRA compute).

Every row of a batch carries the same request, so no padding enters the timing. Variants alternate within each
round (order reversed every other round) and the median over rounds is reported, with ratios against the gated
adapter (> 1: the adapter is faster). Nothing here asserts on a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from _common import RESULTS_DIR, environment, setup, table, wait_for_quiet

QUERY = "Given what you know about me, what should I cook for dinner tonight?"


def context_block(formatter, tokens: int) -> str:
    """A memory block that adds about ``tokens`` tokens to a prompt."""
    from prism_lightning.contexts.fixtures import memory_fixture
    from prism_lightning.contexts.kinds import render_block

    facts = memory_fixture(16, seed=0).text.splitlines()
    lines: list[str] = []
    plain = len(formatter.prompt_ids(QUERY))
    while len(formatter.prompt_ids(QUERY, render_block("memory", "\n".join(lines)))) - plain < tokens:
        lines.append(f"{len(lines) + 1}. {facts[len(lines) % len(facts)][2:]}")
    return render_block("memory", "\n".join(lines))


def serve(model, prompt, batch: int, new: int, cache=None, prefix_len: int = 0) -> tuple[float, float]:
    """(TTFT, decode seconds): prefill ``prompt`` (after ``prefix_len`` cached tokens) then ``new`` greedy steps."""
    import torch
    from transformers import DynamicCache

    ids = torch.tensor([prompt[prefix_len:]] * batch)
    start = time.perf_counter()
    past = cache if cache is not None else DynamicCache()
    mask = torch.ones(batch, prefix_len + ids.shape[1], dtype=torch.long)
    out = model(input_ids=ids, attention_mask=mask, past_key_values=past, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new):
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)
        out = model(input_ids=token, attention_mask=mask, past_key_values=past, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    decode = time.perf_counter() - start
    if cache is not None:
        cache.crop(prefix_len - cache.get_seq_length())  # back to the shared context (a negative count removes)
    return ttft, decode


def measure(bb, peft_model, gate, length: int, batch: int, new: int, reps: int) -> dict:
    """Median TTFT and decode tokens/s of the three variants at one context length and batch size."""
    import torch
    from transformers import DynamicCache

    from prism_lightning.model.chat import ChatFormatter
    from prism_lightning.model.features import layer0_features

    formatter = ChatFormatter(bb.tokenizer)
    block = context_block(formatter, length)
    with_context = formatter.prompt_ids(QUERY, block)
    prefix = formatter.context_prefix(block)
    plain = formatter.prompt_ids(QUERY)
    with peft_model.disable_adapter():
        cache = DynamicCache()
        peft_model(input_ids=torch.tensor([prefix] * batch), past_key_values=cache, use_cache=True,
                   logits_to_keep=1)

    def prepended() -> tuple[float, float]:
        with peft_model.disable_adapter():
            return serve(peft_model, with_context, batch, new)

    def cached() -> tuple[float, float]:
        with peft_model.disable_adapter():
            return serve(peft_model, with_context, batch, new, cache, len(prefix))

    def gated() -> tuple[float, float]:
        start = time.perf_counter()
        ids = torch.tensor([plain] * batch)
        with peft_model.disable_adapter():
            features = layer0_features(peft_model, ids, torch.ones_like(ids), torch.full((batch,), len(plain) - 1))
        torch.sigmoid(gate(features))  # the route; every row goes to the adapter (the costlier side)
        routing = time.perf_counter() - start
        routing_times.append(routing)
        ttft, decode = serve(peft_model, plain, batch, new)
        return ttft + routing, decode

    routing_times: list[float] = []
    variants = {"prepended": prepended, "prefix-cached": cached, "gated adapter": gated}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    with torch.no_grad():
        for fn in variants.values():
            fn()  # warm-up
        for rep in range(reps):
            for name in (list(variants) if rep % 2 == 0 else list(variants)[::-1]):
                times[name].append(variants[name]())
    out = {"context_tokens": len(with_context) - len(plain), "cached_prefix_tokens": len(prefix),
           "prompt_tokens_with_context": len(with_context),
           "prompt_tokens_without": len(plain), "batch": batch, "new_tokens": new, "reps": reps}
    for name, pairs in times.items():
        ttft = statistics.median(t for t, _ in pairs)
        decode = statistics.median(d for _, d in pairs)
        out[name] = {"ttft_s": round(ttft, 4), "decode_tokens_per_s": round(batch * new / decode, 2),
                     "ttft_all_s": [round(t, 4) for t, _ in pairs], "decode_all_s": [round(d, 4) for _, d in pairs]}
    out["gated adapter"]["routing_s"] = round(statistics.median(routing_times[1:] or routing_times), 4)  # no warm-up
    base = out["gated adapter"]
    for name in ("prepended", "prefix-cached"):
        out[name]["ttft_ratio_vs_gated"] = round(out[name]["ttft_s"] / base["ttft_s"], 3)
        out[name]["decode_speed_ratio_gated_vs_this"] = round(
            base["decode_tokens_per_s"] / out[name]["decode_tokens_per_s"], 3)
    return out


def main(argv: list[str] | None = None) -> Path:
    """Run the grid, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short contexts, batch 1 and 2, one round")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new", type=int, default=32, help="decode steps after the first token")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=["4096x16"], help="length x batch cells not run")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "context_latency.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.batches, args.new, args.reps, args.skip = [48, 96], [1, 2], 3, 1, []
    setup()
    import torch

    from prism_lightning.model.backbone import BackboneConfig, load_backbone
    from prism_lightning.model.gate_mlp import GateMLP
    from prism_lightning.model.lora import LoraSettings, attach_lora

    quiet = wait_for_quiet(10 if args.quick else 90)
    bb = load_backbone(BackboneConfig())
    peft_model = attach_lora(bb, LoraSettings())
    torch.manual_seed(0)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # non-zero B: the timed adapter is a trained one in all but its values
            param.data.normal_(0, 0.01)
    peft_model.eval()
    gate = GateMLP(bb.model.config.hidden_size, (128, 64)).eval()
    # The first LoRA and cache forwards of a process are slower than any later one: one throwaway cell first.
    measure(bb, peft_model, gate, min(args.lengths), 1, min(args.new, 4), 1)
    cells = []
    for length in args.lengths:
        for batch in args.batches:
            if f"{length}x{batch}" in args.skip:
                continue
            cell = measure(bb, peft_model, gate, length, batch, args.new, args.reps)
            cells.append(cell)
            print(f"context {cell['context_tokens']} tokens, batch {batch}: "
                  + ", ".join(f"{n} TTFT {cell[n]['ttft_s'] * 1000:.0f} ms / {cell[n]['decode_tokens_per_s']:.1f} tok/s"
                              for n in ("prepended", "prefix-cached", "gated adapter")), flush=True)
    rows = [[c["context_tokens"], c["batch"], f"{c['prepended']['ttft_s'] * 1000:.0f}",
             f"{c['prefix-cached']['ttft_s'] * 1000:.0f}", f"{c['gated adapter']['ttft_s'] * 1000:.0f}",
             c["prepended"]["ttft_ratio_vs_gated"], c["prefix-cached"]["ttft_ratio_vs_gated"],
             c["prepended"]["decode_tokens_per_s"], c["prefix-cached"]["decode_tokens_per_s"],
             c["gated adapter"]["decode_tokens_per_s"]] for c in cells]
    print(table(rows, ["context", "batch", "TTFT prepended ms", "TTFT prefix-cached ms", "TTFT gated ms",
                       "TTFT prep/gated", "TTFT cached/gated", "tok/s prep", "tok/s cached", "tok/s gated"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": " ".join(["python", "bench/context_latency.py", *(argv if argv is not None else sys.argv[1:])]),
               "dtype": str(bb.model.dtype), "cells": cells, "quiet": quiet, "skipped": args.skip,
               "environment": environment()}
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"results written to {args.out}")
    return args.out


if __name__ == "__main__":
    main()
