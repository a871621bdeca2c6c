"""Issue-3 targets: cost of gated generation, of mixed-batch routing, and of the online teacher in training.

(a) ``GatedModel.generate(route="gate")`` / plain generation with the adapter disabled, same 16 prompts,
    greedy, 64 new tokens, batch 16.                                                     target <= 1.03
(b) per-query adapter toggling (batch 1; ``disable_adapter()`` for base rows) / one mixed batch of 16 with
    ``adapter_names`` half "prism", half "__base__".                                     target >= 6x
(c) PrismModule training step with the online teacher / plain LoRA step (same batch of 4 distill items with
    ~200 response tokens, same student forward + KL + backward + AdamW step, but the teacher logits computed once
    beforehand instead of by a teacher forward each step).                               target <= 1.4

No export is needed: LoRA is attached with ``attach_lora(bb, LoraSettings())``, which rewrites the process's
cached backbone in place, so this script must run in its own process. The adapter is renamed "prism" (the name
GatedModel routes to). Its B matrices keep PEFT's zero init, so every variant generates the same tokens (checked
and reported) while paying the full LoRA compute. The gate is an untrained ``GateMLP(576)`` (seed 0); how many
rows it routes to the adapter is reported.

Each part takes 1.5-3.5 minutes on 2 idle cores; run them one per process to keep each run short:

    PRISM_CACHE_DIR=/tmp/prismcache python bench/gated_generation.py --part a
    PRISM_CACHE_DIR=/tmp/prismcache python bench/gated_generation.py --part b
    PRISM_CACHE_DIR=/tmp/prismcache python bench/gated_generation.py --part c

Each run merges its part into bench/results/gated_generation.json. The reported ratio ("value") is the median of
the per-round ratios (the two variants of a round ran back to back); the ratio of medians is stored next to it.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from _common import (
    QUESTIONS,
    environment,
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

TARGETS = {"a": ("<=", 1.03), "a-half": ("<=", 1.05), "b": (">=", 6.0), "c": ("<=", 1.4), "c-cached": ("<=", 1.1)}
ADAPTER, BASE = "prism", "__base__"


def met(part: str, value: float) -> bool:
    op, bound = TARGETS[part]
    return value <= bound if op == "<=" else value >= bound


def verdict(part: str, value: float) -> str:
    op, bound = TARGETS[part]
    return f"target {op} {bound}: {'met' if met(part, value) else 'MISSED'}"


def attach_prism_lora(bb):
    """attach_lora + rename the adapter from PEFT's "default" to "prism"; eval mode (routing needs it)."""
    from prism_lightning.model.lora import LoraSettings, attach_lora

    peft_model = attach_lora(bb, LoraSettings())
    peft_model.add_adapter(ADAPTER, copy.deepcopy(peft_model.peft_config["default"]))
    peft_model.set_adapter(ADAPTER)
    peft_model.delete_adapter("default")
    peft_model.eval()
    return peft_model


def tokens(results: list[dict]) -> int:
    return sum(r["new_tokens"] for r in results)


def part_a(bb, peft_model, reps: int, new_tokens: int = 64) -> dict:
    import torch

    from prism_lightning.inference.gated_model import GatedModel
    from prism_lightning.model.chat import ChatFormatter
    from prism_lightning.model.gate_mlp import GateMLP
    from prism_lightning.model.generation import DecodingConfig, generate_batch

    torch.manual_seed(0)
    gate = GateMLP(bb.model.config.hidden_size).eval()
    gated = GatedModel(bb, peft_model, gate, threshold=0.5, temperature=1.0, adapters=[ADAPTER])
    formatter = ChatFormatter(bb.tokenizer)
    decoding = DecodingConfig(max_new_tokens=new_tokens, temperature=0, batch_size=16)

    # The untrained gate may send (almost) every row one way. A second copy whose output bias is shifted by the
    # median logit routes exactly half of these 16 prompts to the adapter: the mixed case a trained gate produces.
    half_gate = copy.deepcopy(gate)
    with torch.no_grad():
        logits = torch.logit(gated.route([formatter.prompt_ids(q) for q in QUESTIONS]).double())
        ordered = logits.sort().values
        half_gate.net[-1].bias -= float((ordered[7] + ordered[8]) / 2)
    half = GatedModel(bb, peft_model, half_gate, threshold=0.5, temperature=1.0,
                      adapters=[ADAPTER])

    def gated_run() -> list[dict]:
        return gated.generate(QUESTIONS, decoding, route="gate")

    def gated_half_run() -> list[dict]:
        return half.generate(QUESTIONS, decoding, route="gate")

    def all_adapter_run() -> list[dict]:  # the batch the half-routed one replaces: every row on the adapter
        return gated.generate(QUESTIONS, decoding, route="adapter")

    def base_run() -> list[dict]:  # formatting included on both sides: GatedModel.generate formats too
        with peft_model.disable_adapter():
            return generate_batch(bb, [formatter.prompt_ids(q) for q in QUESTIONS], decoding)

    print(f"(a) gated generation vs base generation (adapter disabled): 16 prompts, greedy, {new_tokens} new tokens, "
          "batch 16")
    timing = interleaved({"gated": gated_run, "base_adapter_disabled": base_run, "gated_half_routed": gated_half_run,
                          "all_adapter": all_adapter_run}, reps=reps)
    g, b, h, al = timing["gated"], timing["base_adapter_disabled"], timing["gated_half_routed"], timing["all_adapter"]
    ratio_half = paired_ratios(h["times_s"], b["times_s"])
    half_vs_all = paired_ratios(h["times_s"], al["times_s"])
    routed_half = sum(r["route"] == "adapter" for r in h["result"])
    ratio = paired_ratios(g["times_s"], b["times_s"])
    routed = sum(r["route"] == "adapter" for r in g["result"])
    same = sum(x["text"] == y["text"] for x, y in zip(g["result"], b["result"]))
    value = ratio["median_of_pairs"]  # pairs ran back to back: robust to load drift
    print(rounds_note(timing))
    print(table([["gated (route=gate)", g["median_s"], tokens(g["result"]), tokens(g["result"]) / g["median_s"]],
                 ["base (adapter disabled)", b["median_s"], tokens(b["result"]), tokens(b["result"]) / b["median_s"]],
                 ["gated, bias shifted: half routed", h["median_s"], tokens(h["result"]),
                  tokens(h["result"]) / h["median_s"]]],
                ["variant", "median s", "tokens", "tokens/s"]))
    print(f"gated / base = {value:.3f} median of paired reps (ratio of medians {ratio['ratio_of_medians']:.3f}; "
          f"{verdict('a', value)}); "
          f"gate routed {routed}/16 rows to the adapter; identical texts {same}/16")
    print(f"informative: gated with {routed_half}/16 rows routed / base = {ratio_half['median_of_pairs']:.3f} median "
          f"of paired reps (ratio of medians {ratio_half['ratio_of_medians']:.3f})")
    print(f"gated with {routed_half}/16 rows routed / all 16 on the adapter = {half_vs_all['median_of_pairs']:.3f} "
          f"({verdict('a-half', half_vs_all['median_of_pairs'])})\n")
    return {"description": "GatedModel.generate(route='gate') / generate_batch with peft_model.disable_adapter()",
            "timing": strip_results(timing), "clean": timing.rounds["clean"], "ratio": ratio, "value": value, "rows_routed_to_adapter": routed,
            "half_routed": {"rows_routed_to_adapter": routed_half, "ratio": ratio_half,
                            "value": ratio_half["median_of_pairs"], "over_all_adapter": half_vs_all,
                            "target": {"op": "<=", "bound": TARGETS["a-half"][1],
                                       "met": met("a-half", half_vs_all["median_of_pairs"])}},
            "identical_texts": same, "generated_tokens": {"gated": tokens(g["result"]),
                                                          "base": tokens(b["result"])},
            "target": {"op": "<=", "bound": TARGETS["a"][1], "met": met("a", value)}}


def part_b(bb, peft_model, reps: int, new_tokens: int = 64) -> dict:
    from prism_lightning.model.chat import ChatFormatter
    from prism_lightning.model.generation import DecodingConfig, generate_batch

    formatter = ChatFormatter(bb.tokenizer)
    prompts = [formatter.prompt_ids(q) for q in QUESTIONS]
    names = [ADAPTER if i % 2 == 0 else BASE for i in range(len(prompts))]
    decoding = DecodingConfig(max_new_tokens=new_tokens, temperature=0, batch_size=16)

    def mixed_batch() -> list[dict]:
        return generate_batch(bb, prompts, decoding, model=peft_model, adapter_names=names)

    def toggle_one(prompt, name) -> dict:
        if name == BASE:
            with peft_model.disable_adapter():
                return generate_batch(bb, [prompt], decoding, model=peft_model)[0]
        return generate_batch(bb, [prompt], decoding, model=peft_model)[0]

    def per_query() -> list[dict]:
        return [toggle_one(p, n) for p, n in zip(prompts, names)]

    print("(b) mixed-batch routing (one call, 8 prism + 8 __base__ rows) vs per-query adapter toggling (batch 1)")
    timing = interleaved({"mixed_batch_16": mixed_batch, "per_query_toggle_1": per_query}, reps=reps,
                         warmups={"per_query_toggle_1": lambda: [toggle_one(p, n) for p, n in
                                                                 zip(prompts[:2], names[:2])]})
    m, p = timing["mixed_batch_16"], timing["per_query_toggle_1"]
    ratio = paired_ratios(p["times_s"], m["times_s"])
    tps_m, tps_p = tokens(m["result"]) / m["median_s"], tokens(p["result"]) / p["median_s"]
    same = sum(x["text"] == y["text"] for x, y in zip(m["result"], p["result"]))
    value = ratio["median_of_pairs"]  # pairs ran back to back: robust to load drift
    print(rounds_note(timing))
    print(table([["mixed batch of 16", m["median_s"], tokens(m["result"]), tps_m],
                 ["per-query toggling, batch 1", p["median_s"], tokens(p["result"]), tps_p]],
                ["variant", "median s", "tokens", "tokens/s"]))
    print(f"per-query / mixed-batch time = {value:.2f}x median of paired reps (ratio of medians "
          f"{ratio['ratio_of_medians']:.2f}x; "
          f"tokens/s ratio {tps_m / tps_p:.2f}x; {verdict('b', value)}); identical texts {same}/16\n")
    return {"description": "per-query toggling (batch 1) time / one mixed-batch generate_batch(adapter_names) of 16",
            "timing": strip_results(timing), "clean": timing.rounds["clean"], "ratio": ratio, "value": value,
            "tokens_per_s_ratio": round(tps_m / tps_p, 4), "identical_texts": same,
            "generated_tokens": {"mixed": tokens(m["result"]), "per_query": tokens(p["result"])},
            "target": {"op": ">=", "bound": TARGETS["b"][1], "met": met("b", value)}}


def distill_items(tokenizer, n_items: int = 4) -> list[dict]:
    """Synthetic distill items (label 1, persona "math") with response lengths around 200 tokens."""
    base_text = ("To solve this, first write the equation clearly and name every quantity. Then isolate the unknown "
                 "by applying the same operation to both sides, and check each step for sign errors. For example, "
                 "if 3x + 5 = 20, subtract 5 to get 3x = 15 and divide by 3 to get x = 5. Substitute the value "
                 "back into the original equation to verify it: 3 * 5 + 5 = 20, which holds. The same method "
                 "works for systems of equations, where you eliminate one variable at a time. ")
    questions = ["How do I solve a linear equation?", "Can you explain how to check a solution to an equation?",
                 "What is the elimination method for systems of equations?", "How should I approach algebra "
                 "word problems?"]
    ids = tokenizer(base_text * 4, add_special_tokens=False)["input_ids"]
    items = []
    for i in range(n_items):
        length = (200, 190, 210, 195)[i % 4]
        answer = tokenizer.decode(ids[i * 7:i * 7 + length]).strip()
        items.append({"id": f"d{i}", "query": questions[i % len(questions)], "persona_answer": answer,
                      "baseline_answer": "Isolate the variable.", "target_persona": "math", "label": 1})
    return items


def part_c(bb, peft_model, reps: int, new_tokens: int = 64) -> dict:  # new_tokens unused
    import torch

    from prism_lightning.contexts.personas import PersonaConfig, PersonaRegistry
    from prism_lightning.model.chat import ChatFormatter
    from prism_lightning.training.datamodule import Collator
    from prism_lightning.training.losses import chunked_topk_kl, rows_at
    from prism_lightning.training.modules.prism import PrismModule

    registry = PersonaRegistry.from_config(PersonaConfig(names=["math"]))
    collate = Collator(ChatFormatter(bb.tokenizer), {p.name: p.text for p in registry}, max_length=512)
    batch = collate(distill_items(bb.tokenizer))

    module = PrismModule()
    if peft_model is not None:  # parts a/b already wrapped the backbone in this process: reuse that wrapper
        module.model = peft_model
    module.configure_model()
    module.model.train()
    hp = module.hparams
    lora_params = module.trainable_parameters()
    opt_prism = torch.optim.AdamW([{"params": lora_params, "lr": hp.lr},
                                   {"params": list(module.gate.parameters()), "lr": hp.gate_lr}],
                                  weight_decay=hp.weight_decay)
    opt_plain = torch.optim.AdamW(lora_params, lr=hp.lr, weight_decay=hp.weight_decay)
    mask = batch["response_mask"]
    args = (batch["teacher_ids"], batch["teacher_mask"], batch["teacher_pos"], mask, 1, batch["teacher_prefix"])
    cached_values, cached_index = module.teacher_targets(*args)  # the plain step's teacher, outside the timing

    def prism_step_on(step_batch: dict):
        """One PrismModule training step (forward, backward, AdamW) on ``step_batch``."""
        def step() -> float:
            opt_prism.zero_grad(set_to_none=True)
            loss = module.training_step(step_batch, 0)
            loss.backward()
            opt_prism.step()
            return float(loss)
        return step

    prism_step = prism_step_on(batch)

    def prism_step_full_teacher() -> float:
        """The online step recomputing the persona block in every teacher forward (``prefix_reuse: false``)."""
        hp.prefix_reuse = False
        try:
            return prism_step()
        finally:
            hp.prefix_reuse = True

    def plain_step() -> float:
        """The same student forward, head and top-k KL as the library's step, against teacher targets given."""
        opt_plain.zero_grad(set_to_none=True)
        student = rows_at(module.student_hidden(batch), batch["student_pos"], mask)
        loss = chunked_topk_kl(module.head_logits, student, cached_values, cached_index, hp.temperature,
                               hp.head_chunk).mean()
        loss.backward()
        opt_plain.step()
        return float(loss)

    def teacher_only() -> None:
        module.teacher_targets(*args)

    # data.teacher: cached — the same batch with the teacher's top-k read from a cache built beforehand.
    import tempfile

    from prism_lightning.training.teacher_cache import build_teacher_cache

    with tempfile.TemporaryDirectory() as cache_dir:
        items = distill_items(bb.tokenizer)
        collate.teacher_cache = build_teacher_cache(bb, [collate.encode_item(i) for i in items], hp.top_k,
                                                    Path(cache_dir), batch_size=4)
        cached_batch = collate(items)

    prism_step_cached = prism_step_on(cached_batch)

    s_len, t_len = batch["student_ids"].shape[1], batch["teacher_ids"].shape[1]
    n_resp = batch["response_mask"].sum(1).tolist()
    print(f"(c) training step, batch of 4 distill items: student {s_len} tokens/row, teacher (persona) {t_len} "
          f"tokens/row, response tokens {n_resp}")
    timing = interleaved({"prism_step_online_teacher": prism_step, "plain_lora_step": plain_step,
                          "prism_step_cached_teacher": prism_step_cached, "teacher_forward_only": teacher_only,
                          "prism_step_online_no_prefix_reuse": prism_step_full_teacher}, reps=reps)
    pr, pl, pc, te, pf = (timing[k] for k in ("prism_step_online_teacher", "plain_lora_step",
                                              "prism_step_cached_teacher", "teacher_forward_only",
                                              "prism_step_online_no_prefix_reuse"))
    cached_ratio = paired_ratios(pc["times_s"], pl["times_s"])
    full_ratio = paired_ratios(pf["times_s"], pl["times_s"])
    ratio = paired_ratios(pr["times_s"], pl["times_s"])
    value = ratio["median_of_pairs"]  # pairs ran back to back: robust to load drift
    print(rounds_note(timing))
    print(table([["PrismModule step (online teacher)", pr["median_s"]], ["plain LoRA step", pl["median_s"]],
                 ["PrismModule step (cached teacher)", pc["median_s"]],
                 ["PrismModule step (online, persona block recomputed)", pf["median_s"]],
                 ["teacher forward alone (top-k targets)", te["median_s"]]],
                ["variant", "median s"]))
    print(f"prism / plain = {value:.3f} median of paired reps (ratio of medians {ratio['ratio_of_medians']:.3f}; "
          f"{verdict('c', value)}); "
          f"teacher forward alone = {te['median_s'] / pl['median_s']:.3f} of a plain step; cached teacher / plain "
          f"= {cached_ratio['median_of_pairs']:.3f} ({verdict('c-cached', cached_ratio['median_of_pairs'])}); "
          f"online without prefix reuse / plain = {full_ratio['median_of_pairs']:.3f}\n")
    return {"description": "PrismModule.training_step + backward + AdamW / same student step with precomputed teacher",
            "timing": strip_results(timing), "clean": timing.rounds["clean"], "ratio": ratio, "value": value,
            "teacher_forward_over_plain_step": round(te["median_s"] / pl["median_s"], 4),
            "online_without_prefix_reuse": {"ratio": full_ratio, "value": full_ratio["median_of_pairs"]},
            "cached": {"ratio": cached_ratio, "value": cached_ratio["median_of_pairs"],
                       "target": {"op": "<=", "bound": TARGETS["c-cached"][1],
                                  "met": met("c-cached", cached_ratio["median_of_pairs"])}},
            "batch": {"rows": 4, "student_tokens": s_len, "teacher_tokens": t_len, "response_tokens": n_resp},
            "target": {"op": "<=", "bound": TARGETS["c"][1], "met": met("c", value)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", nargs="+", choices=["a", "b", "c"], default=["a", "b", "c"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="generation length in parts a and b")
    args = parser.parse_args()
    setup()
    bb = load()
    parts = sorted(set(args.part))
    peft_model = attach_prism_lora(bb) if {"a", "b"} & set(parts) else None
    start_conditions = wait_for_quiet()
    results = {}
    for part in parts:  # a and b need eval mode; c switches to train mode, so it runs last
        results[part] = {"a": part_a, "b": part_b, "c": part_c}[part](bb, peft_model, args.reps, args.max_new_tokens)
        results[part]["start_conditions"] = start_conditions
        results[part]["environment"] = environment()
    rows = [[k, results[k]["value"], f"{TARGETS[k][0]} {TARGETS[k][1]}", "met" if results[k]["target"]["met"]
             else "MISSED"] for k in parts]
    print(table(rows, ["part", "ratio", "target", "verdict"]))
    write_results("gated_generation", {f"part_{k}": v for k, v in results.items()}, merge=True)


if __name__ == "__main__":
    main()
