"""Batched generation (one generate_batch call over 16 prompts) vs per-item generation (16 calls of batch 1).

Same 16 chat-formatted prompts, greedy, 64 new tokens at most. Throughput counts the tokens each row really
generated (``new_tokens``: up to, not including, the end-of-turn token). Target: batched >= 6x per-item tokens/s.

    PRISM_CACHE_DIR=/tmp/prismcache python bench/generation_throughput.py
"""

from __future__ import annotations

import argparse

from _common import (
    QUESTIONS,
    interleaved,
    load,
    paired_ratios,
    rounds_note,
    setup,
    strip_results,
    table,
    wait_for_quiet,
    write_results,
)

TARGET = 6.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    setup()
    from prism_lightning.model.chat import ChatFormatter
    from prism_lightning.model.generation import DecodingConfig, generate_batch

    bb = load()
    formatter = ChatFormatter(bb.tokenizer)
    prompts = [formatter.prompt_ids(q) for q in QUESTIONS]
    decoding = DecodingConfig(max_new_tokens=args.max_new_tokens, temperature=0, batch_size=16)

    def batched() -> list[dict]:
        return generate_batch(bb, prompts, decoding)

    def per_item() -> list[dict]:
        return [generate_batch(bb, [p], decoding)[0] for p in prompts]

    print(f"16 prompts ({min(map(len, prompts))}-{max(map(len, prompts))} prompt tokens), greedy, "
          f"max_new_tokens={decoding.max_new_tokens}")
    start_conditions = wait_for_quiet()
    # The per-item warm-up runs 2 of the 16 prompts: same code path, a fraction of the time.
    timing = interleaved({"batched_16": batched, "per_item_1": per_item}, reps=args.reps,
                         warmups={"per_item_1": lambda: [generate_batch(bb, [p], decoding)[0] for p in prompts[:2]]})

    rows, summary = [], {}
    for name, entry in timing.items():
        tokens = sum(r["new_tokens"] for r in entry["result"])
        finished = sum(r["finished"] for r in entry["result"])
        tps = tokens / entry["median_s"]
        summary[name] = {"generated_tokens": tokens, "rows_finished_by_eos": finished,
                         "median_s": entry["median_s"], "tokens_per_s": round(tps, 3)}
        rows.append([name, tokens, finished, entry["median_s"], tps])
    b, p = summary["batched_16"], summary["per_item_1"]
    speedup = b["tokens_per_s"] / p["tokens_per_s"]
    same_text = sum(x["text"] == y["text"] for x, y in zip(timing["batched_16"]["result"],
                                                          timing["per_item_1"]["result"]))
    wall = paired_ratios(timing["per_item_1"]["times_s"], timing["batched_16"]["times_s"])
    print(f"\n{rounds_note(timing)}")
    print(table(rows, ["variant", "tokens", "eos rows", "median s", "tokens/s"]))
    print(f"\nthroughput ratio batched/per-item: {speedup:.2f}x (target >= {TARGET}x: "
          f"{'met' if speedup >= TARGET else 'MISSED'}); wall-time ratio per-item/batched, median of paired "
          f"reps: {wall['median_of_pairs']:.2f}x; identical texts: {same_text}/16")

    write_results("generation_throughput", {
        "config": {"prompts": len(prompts), "max_new_tokens": decoding.max_new_tokens, "temperature": 0,
                   "batch_size": 16, "reps": args.reps,
                   "prompt_tokens": [len(p) for p in prompts]},
        "start_conditions": start_conditions, "variants": summary, "timing": strip_results(timing),
        "throughput_ratio_batched_over_per_item": round(speedup, 3),
        "wall_ratio_per_item_over_batched": wall,
        "identical_texts": same_text,
        "clean": timing.rounds["clean"],
        "target": {"ratio_at_least": TARGET, "met": speedup >= TARGET},
    })


if __name__ == "__main__":
    main()
