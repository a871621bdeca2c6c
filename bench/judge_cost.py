"""Cost of the stage-3 pairwise judge per pair (both orders) on the embedded model, next to stage-2 generation.

Times ``Judge(bb, JudgeConfig(batch_size=8)).score_pairs`` on 16 pairs of short answers (a fresh temporary
JsonlSink each repetition, so nothing is skipped as already done), and, interleaved with it, one batched
``generate_batch`` of 16 answers of exactly 96 new tokens (stage-2 sampling: temperature 0.7; end-of-turn is
suppressed with ``min_new_tokens=96`` so every answer has the same length). No target: the point is to see the
judge cost relative to generating the answers it judges.

    PRISM_CACHE_DIR=/tmp/prismcache python bench/judge_cost.py
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

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

# (candidate, baseline): a fuller persona-style answer and a terse baseline, both short.
ANSWERS = [
    ("The capital of France is Paris, which is also its largest city.", "Paris."),
    ("Plants use sunlight, water and carbon dioxide to make sugar and release oxygen.",
     "Plants make food from light."),
    ("Waves hush beneath the silver moon, / the tide hums a quiet tune.", "The ocean is dark at night."),
    ("Use my_list.reverse() to reverse in place, or my_list[::-1] to get a reversed copy.",
     "Call reversed() on it."),
    ("Keep a regular schedule, avoid screens before bed, and keep the room cool and dark.",
     "Sleep more and drink less coffee."),
    ("Air molecules scatter short blue wavelengths of sunlight more than red ones (Rayleigh scattering).",
     "Because of the air."),
    ("Two young lovers from feuding families marry in secret. A chain of misunderstandings ends in their deaths.",
     "Two lovers die."),
    ("Viruses need a host cell to replicate; bacteria are living cells that reproduce on their own.",
     "Bacteria are bigger."),
    ("Mix 1 cup flour, 1 egg, 1 cup milk and a pinch of salt; cook ladlefuls on a hot buttered pan.",
     "Mix flour, eggs and milk, then fry."),
    ("Interest is added to the balance, so later interest is earned on earlier interest too.",
     "You earn interest on interest."),
    ("17 x 23 = 17 x 20 + 17 x 3 = 340 + 51 = 391.", "It is 391."),
    ("'Buenos dias, ¿como estas?'", "Hola."),
    ("Earth's axis is tilted about 23.5 degrees, so each hemisphere gets more direct sunlight part of the year.",
     "The distance to the sun changes."),
    ("How about Sunny, Biscuit or Maple?", "Max."),
    ("Research the company, practise common questions aloud, and prepare two questions of your own.",
     "Be on time."),
    ("A black hole is a place where gravity is so strong that not even light can escape.", "A hole in space."),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--answer-tokens", type=int, default=96)
    args = parser.parse_args()
    setup()
    from prism_lightning.bootstrap.config import JudgeConfig
    from prism_lightning.bootstrap.judge import PAIRWISE, Judge
    from prism_lightning.model.chat import ChatFormatter
    from prism_lightning.model.generation import DecodingConfig, generate_batch
    from prism_lightning.utils.jsonl import JsonlSink

    bb = load()
    config = JudgeConfig(batch_size=8)
    judge = Judge(bb, config)
    pairs = [{"id": f"q{i:02d}", "question": q, "candidate": c, "baseline": b}
             for i, (q, (c, b)) in enumerate(zip(QUESTIONS, ANSWERS))]
    formatter = ChatFormatter(bb.tokenizer)
    gen_prompts = [formatter.prompt_ids(q) for q in QUESTIONS]
    gen_decoding = DecodingConfig(max_new_tokens=args.answer_tokens, temperature=0.7, top_p=1.0, top_k=0,
                                  seed=2, batch_size=16)
    tmp = Path(tempfile.mkdtemp(prefix="prism-judge-bench-"))
    counter = {"n": 0}

    def judge_pairs() -> list[dict]:
        counter["n"] += 1
        sink = JsonlSink(tmp / f"judge-{counter['n']}.jsonl")
        judge.score_pairs(pairs, sink, "bench")
        return sink.records()

    def generate_answers() -> list[dict]:
        return generate_batch(bb, gen_prompts, gen_decoding, seed=gen_decoding.seed,
                              min_new_tokens=args.answer_tokens)

    # Shape of what the judge forwards: both orders of every pair, batch_size pairs (= 2x prompts) per forward.
    forwards = math.ceil(len(pairs) / config.batch_size)
    lengths = [len(judge._prompt_ids(PAIRWISE.format(question=p["question"], a=judge.truncate(p["baseline"]),
                                                     b=judge.truncate(p["candidate"])))) for p in pairs]
    print(f"{len(pairs)} pairs, judge batch_size={config.batch_size} pairs -> {forwards} forwards of "
          f"{2 * config.batch_size} prompts; judge prompt tokens {min(lengths)}-{max(lengths)} "
          f"(mean {sum(lengths) / len(lengths):.0f})")
    start_conditions = wait_for_quiet()
    timing = interleaved({"judge_16_pairs": judge_pairs, "generate_16x96": generate_answers}, reps=args.reps)

    judge_s = timing["judge_16_pairs"]["median_s"]
    gen_s = timing["generate_16x96"]["median_s"]
    records = timing["judge_16_pairs"]["result"]
    gen_tokens = [r["new_tokens"] for r in timing["generate_16x96"]["result"]]
    per_pair = judge_s / len(pairs)
    per_forward = judge_s / forwards
    per_prompt = judge_s / (2 * len(pairs))
    per_answer = gen_s / len(gen_prompts)
    ratio = paired_ratios([t / len(pairs) for t in timing["judge_16_pairs"]["times_s"]],
                          [t / len(gen_prompts) for t in timing["generate_16x96"]["times_s"]])
    print(f"\n{rounds_note(timing)}")
    print(table([
        ["judge: 16 pairs, both orders", judge_s, f"{per_pair:.3f} s/pair", f"{per_forward:.3f} s/forward",
         f"{per_prompt:.3f} s/judge prompt"],
        [f"generate: 16 answers x {args.answer_tokens} tok, batch 16", gen_s, f"{per_answer:.3f} s/answer",
         f"{gen_s:.3f} s/call", f"{sum(gen_tokens) / gen_s:.1f} tok/s"],
    ], ["variant", "median s", "unit cost", "per call", "other"]))
    print(f"\njudge cost per pair / cost of one {args.answer_tokens}-token answer: {per_pair / per_answer:.3f} "
          f"(median of paired reps {ratio['median_of_pairs']:.3f}); a matched pair needs two answers "
          f"(baseline + persona), so judging adds {per_pair / (2 * per_answer):.1%} to the generation cost of a pair")
    assert len(records) == len(pairs), "judge wrote fewer records than pairs"

    write_results("judge_cost", {
        "config": {"pairs": len(pairs), "judge_batch_size_pairs": config.batch_size, "forwards_per_run": forwards,
                   "prompts_per_forward": 2 * config.batch_size, "judge_prompt_tokens": lengths,
                   "generation": {"answers": len(gen_prompts), "new_tokens": args.answer_tokens,
                                  "temperature": gen_decoding.temperature, "batch_size": 16}, "reps": args.reps},
        "start_conditions": start_conditions, "timing": strip_results(timing), "clean": timing.rounds["clean"],
        "judge_seconds_per_pair": round(per_pair, 4), "judge_seconds_per_forward": round(per_forward, 4),
        "judge_seconds_per_prompt": round(per_prompt, 4),
        "generation_seconds_per_answer": round(per_answer, 4), "generation_seconds_per_call": round(gen_s, 4),
        "generated_tokens_per_answer": gen_tokens,
        "judge_pair_over_one_answer": round(per_pair / per_answer, 4), "judge_pair_over_one_answer_paired": ratio,
        "judge_share_of_pair_generation": round(per_pair / (2 * per_answer), 4),
    })


if __name__ == "__main__":
    main()
