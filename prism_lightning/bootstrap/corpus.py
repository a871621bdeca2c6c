"""Run stages 1–3 into a corpus directory: content-addressed stage files, resumable, with a manifest."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Optional

from prism_lightning.bootstrap import degrade, source_bias
from prism_lightning.bootstrap.answers import answer_personas, run_answers
from prism_lightning.bootstrap.compare import compare_protocols
from prism_lightning.bootstrap.config import AnswerConfig, JudgeConfig, LabelConfig, QueryConfig
from prism_lightning.bootstrap.intent import construction_item, source_counts, split_by_source
from prism_lightning.bootstrap.judge import Judge, verdict_sequences
from prism_lightning.bootstrap.labels import (
    SCORER,
    control_accuracy,
    control_pairs,
    label_queries,
    main_comparisons,
    quality_accuracy,
    quality_comparisons,
    relevance_comparisons,
    scoring_items,
)
from prism_lightning.bootstrap.queries import run_queries
from prism_lightning.bootstrap.source_bias import cross_comparisons, cross_source_accuracy
from prism_lightning.contexts.personas import PersonaConfig, PersonaRegistry
from prism_lightning.distributed.sharding import Shard, ShardedSink
from prism_lightning.model.backbone import Backbone, BackboneConfig, load_backbone, release_backbone
from prism_lightning.model.chat import ChatFormatter, Placement, template_fingerprint
from prism_lightning.model.vllm_engine import VllmEngine, check_vllm_settings
from prism_lightning.utils.errors import PrismError
from prism_lightning.utils.jsonl import read_jsonl_numbered, read_text, write_json, write_jsonl

FORMAT_VERSION = 1


def stable_hash(*parts: Any) -> str:
    """Short sha256 of JSON-serialised parts (dataclasses included), stable across runs."""
    def plain(obj: Any) -> Any:
        return asdict(obj) if is_dataclass(obj) else obj
    blob = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class Corpus:
    """A finished corpus: labelled items and the manifest that describes them."""

    directory: Path
    items: list[dict]
    manifest: dict

    @property
    def distill(self) -> list[dict]:
        """Items whose persona answer won (gate label 1)."""
        return [i for i in self.items if i["label"] == 1]

    @property
    def retain(self) -> list[dict]:
        """Items whose baseline answer stands (gate label 0)."""
        return [i for i in self.items if i["label"] == 0]


def load_corpus(directory: Path) -> Corpus:
    """Read ``corpus.jsonl`` and ``manifest.json`` from a corpus directory."""
    directory = Path(directory)
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        raise PrismError(f"{manifest_path}: corpus manifest not found; run `prism bootstrap` first")
    try:
        manifest = json.loads(read_text(manifest_path, "corpus manifest"))
    except json.JSONDecodeError as exc:
        raise PrismError(f"{manifest_path}:{exc.lineno}: malformed manifest ({exc.msg})") from None
    numbered = read_jsonl_numbered(directory / "corpus.jsonl")
    if not numbered:
        raise PrismError(f"{directory / 'corpus.jsonl'}: the corpus is empty or missing; run `prism bootstrap` "
                         f"(or point data.corpus_dir at a finished corpus)")
    items = [item for _, item in numbered]
    for number, item in numbered:
        missing = {"id", "query", "label", "target_persona", "persona_answer", "baseline_answer"} - set(item)
        if missing:
            raise PrismError(f"{directory / 'corpus.jsonl'}:{number}: malformed corpus line "
                             f"(missing {', '.join(sorted(missing))})")
    return Corpus(directory, items, manifest)


def check_both_classes(corpus: Corpus, judge: JudgeConfig) -> None:
    """Fail with the knob to turn when the corpus lacks distill or retain items."""
    n = len(corpus.items)
    if corpus.distill and corpus.retain:
        return
    empty = "distill (label 1)" if not corpus.distill else "retain (label 0)"
    if judge.protocol == "intent" and (not corpus.retain or judge.scoring is None):
        hint = ("stage 1 kept no question the persona does not help with; lower data.queries.knowledge_every "
                "(2 = every other candidate) or raise data.queries.per_persona" if not corpus.retain else
                "stage 1 kept no persona-domain query; raise data.queries.knowledge_every")
        raise PrismError(f"{corpus.directory / 'corpus.jsonl'}: the {empty} set is empty ({n} items, "
                         f"data.judge.protocol=intent); {hint}")
    hint = ("the persona must win both orders; try data.judge.protocol=debiased" if judge.protocol == "strict"
            else f"{'lower' if not corpus.distill else 'raise'} data.judge.margin (now {judge.margin})")
    raise PrismError(f"{corpus.directory / 'corpus.jsonl'}: the {empty} set is empty ({n} items, "
                     f"data.judge.protocol={judge.protocol}); {hint}, or set data.judge.model "
                     f"to a stronger judge")


class CorpusBuilder:
    """Stages 1–3 on one backbone; each stage's file is named by the hash of everything it depends on."""

    def __init__(self, backbone: BackboneConfig, personas: PersonaConfig, queries: QueryConfig,
                 answers: AnswerConfig, judge: JudgeConfig, placement: Placement, directory: Path,
                 labels: LabelConfig = LabelConfig(), engine: str = "hf",
                 scoring_engine: Optional[str] = None) -> None:
        self.backbone_config = backbone
        self.registry = PersonaRegistry.from_config(personas)
        self.queries, self.answers, self.judge = queries, answers, judge
        self.samples = labels.samples
        self.placement = placement
        self.directory = Path(directory)
        self.engine = engine  # stages 1-2 (generation)
        self.scoring_engine = scoring_engine or engine  # stage 3 (the judge's log-probs)

    def scorer_kinds(self) -> list[str]:
        """The judge scorers this run needs: the scoring protocol's, or all of them when comparing protocols
        (none under ``intent`` with ``intent_scorer: none`` and no comparison: nothing is judged)."""
        own = SCORER.get(self.judge.scoring or "")
        others = [k for k in ("pairwise", "pointwise", "likelihood") if k != own] if self.judge.compare else []
        return ([own] if own else []) + others

    def knowledge_every(self) -> int:
        """Stage 1's cadence of knowledge questions: only the intent protocol asks for them."""
        return self.queries.knowledge_every if self.judge.protocol == "intent" else 0

    def stage_hashes(self, backbone: Backbone, judge_backbone: Backbone) -> dict[str, str]:
        """Hash per stage; a stage's hash covers its own config and every upstream stage's hash.

        The judge stage has one file per scorer kind (``judge`` for the protocol's, ``judge_<kind>`` for the others
        that ``compare`` adds).
        """
        # A context's kind fixes its block and placement; plain personas hash as they always have.
        personas = {p.name: p.text if p.kind == "persona" else [p.kind, p.placement, p.text] for p in self.registry}
        # Every prompt is rendered through the chat template (and its variables): a new template is a new stage.
        # knowledge_every changes stage 1 only when the intent protocol uses it (so other corpora keep their hash).
        every = self.knowledge_every()
        h_queries = stable_hash(FORMAT_VERSION, backbone.fingerprint, template_fingerprint(backbone.tokenizer),
                                personas, self._intent_free_configs()[0],
                                *([{"knowledge_every": every}] if every else []),
                                *([{"engine": self.engine}] if self.engine != "hf" else []))
        # One sample hashes as before m existed, so existing corpora stay valid.
        h_answers = stable_hash(h_queries, self.answers, self.placement,
                                *([{"samples": self.samples}] if self.samples > 1 else []))
        hashes = {"queries": h_queries, "answers": h_answers}
        for k, kind in enumerate(self.scorer_kinds()):
            # Protocol, margin and min_choice_mass only relabel stored log-probs: they do not invalidate the scores.
            # The stored log-probs are those of the choices' token sequences, so the sequences are part of the hash;
            # so are the controls (two kinds, the quality ones made by degrade.py's generators).
            # A judge on vLLM is named here (the generation engine is in h_answers already): HF-judged files, those
            # of corpora generated on vLLM included, keep their names.
            hashes["judge" if k == 0 else f"judge_{kind}"] = stable_hash(
                h_answers, judge_backbone.fingerprint, template_fingerprint(judge_backbone.tokenizer), kind,
                verdict_sequences(judge_backbone.tokenizer, kind), self.judge.max_answer_tokens,
                self.judge.control_pairs, ["relevance", "quality", degrade.VERSION, "cross_source",
                                           source_bias.VERSION],
                *([{"engine": self.scoring_engine}] if self.scoring_engine != "hf" else []))
        return hashes

    def build(self) -> Corpus:
        """Run (or resume) all stages, then write ``corpus.jsonl`` and ``manifest.json``.

        Under torch.distributed every rank calls this: each runs its share of every stage into its own shard
        file (see ``sharding``), rank 0 merges them and writes the corpus, and all ranks return the same corpus.
        """
        shard = Shard.current()
        check_vllm_settings(self.engine, self.scoring_engine, shard.world)  # before any stage runs
        backbone = load_backbone(self.backbone_config)
        judge_backbone = load_backbone(self.judge.model) if self.judge.model else backbone
        Judge(judge_backbone, self.judge)  # a judge that cannot read verdicts fails now, not after stages 1-2
        hashes = self.stage_hashes(backbone, judge_backbone)
        stages = self.directory / "stages"
        engine = self._engine(backbone) if self.engine == "vllm" else None
        timings: dict[str, float] = {}

        start = time.perf_counter()
        queries = run_queries(backbone, self.registry, self.queries,
                              ShardedSink(stages / f"queries-{hashes['queries']}.jsonl", shard), self.knowledge_every(),
                              engine)
        shard.together(lambda: write_jsonl(self.directory / "queries.jsonl", queries) if shard.rank == 0 else None)
        timings["queries"] = time.perf_counter() - start
        if not queries:
            raise PrismError(f"{self.directory}: stage 1 kept no queries; loosen data.queries.min_chars/"
                             f"near_duplicate or raise data.queries.max_rounds")

        start = time.perf_counter()
        formatter = ChatFormatter(backbone.tokenizer, self.placement)
        answers = run_answers(backbone, formatter, self.registry, queries, self.answers,
                              ShardedSink(stages / f"answers-{hashes['answers']}.jsonl", shard), self.samples,
                              engine)
        timings["answers"] = time.perf_counter() - start

        start = time.perf_counter()
        candidates = {q["id"]: answer_personas(q, self.registry, self.answers) for q in queries}
        # Under intent, queries labelled by construction are never judged; the controls come from the judged ones.
        judged, built = split_by_source(queries, self.judge)
        scoring = self.judge.scored()
        by_kind, controls = {}, []
        if self.scorer_kinds():
            controls = control_pairs(judged, self.judge.control_pairs)
            comparisons = (main_comparisons(judged, candidates, answers, self.samples)
                           + relevance_comparisons(controls, answers) + quality_comparisons(controls, answers)
                           + cross_comparisons(controls, candidates, answers))
            judge_engine = None
            if self.scoring_engine == "vllm":
                judge_engine = (engine if judge_backbone is backbone and engine is not None else
                                self._engine(judge_backbone, self.judge.model))
            judge = Judge(judge_backbone, self.judge, judge_engine)
            for k, kind in enumerate(self.scorer_kinds()):
                sink = ShardedSink(stages / f"judge-{hashes['judge' if k == 0 else f'judge_{kind}']}.jsonl", shard)
                judge.score(kind, scoring_items(kind, comparisons), sink)
                by_kind[kind] = {r["id"]: r for r in sink.records()}
            if judge_engine is not None and judge_engine is not engine:
                judge_engine.close()
        if engine is not None:
            engine.close()  # its weights and KV cache would otherwise stay resident through training
        items, stats, reliability = [], {}, None
        if scoring is not None:
            scores = by_kind[SCORER[scoring.protocol]]
            items, stats = label_queries(judged, candidates, answers, scores, scoring, self.samples)
            stats.update(control_accuracy(controls, scores, scoring))
            stats.update(quality_accuracy(controls, scores, scoring))
            stats.update(cross_source_accuracy(controls, candidates, judged, scores, scoring, samples=self.samples))
            reliability = stats.pop("reliability")
        order = {q["id"]: n for n, q in enumerate(queries)}
        items = sorted(items + [construction_item(q, answers, self.judge) for q in built], key=lambda i: order[i["id"]])
        if scoring is None:
            stats = {"position_bias_rate": None, "tie_rate": 0.0, "unparseable": 0,
                     **control_accuracy([], {}, self.judge), **quality_accuracy([], {}, self.judge)}
            reliability = {"reliability": None, "samples": self.samples, "queries": 0,
                           "reason": "every label is by construction (data.judge.intent_scorer = none): "
                                     "nothing was measured whose reliability could be estimated"}
        stats["intent_scorer"] = self.judge.intent_scorer if self.judge.protocol == "intent" else None
        reliability["label_sources"] = source_counts(items)
        timings["judge"] = time.perf_counter() - start

        manifest = self._manifest(backbone, judge_backbone, hashes, queries, items, stats, timings)
        manifest["labels"] = reliability
        if self.judge.compare:
            manifest["judge_compare"] = compare_protocols(judged, candidates, controls, by_kind,
                                                          scoring or self.judge, self.samples)
        manifest["seconds"], manifest["world_size"] = self._reused_stage_facts(hashes, manifest["seconds"],
                                                                              shard.world)

        def write() -> None:
            if shard.rank == 0:
                write_jsonl(self.directory / "corpus.jsonl", items)
                write_json(self.directory / "manifest.json", manifest)

        shard.together(write)  # every rank returns once the corpus is on disk
        manifest = shard.gather(manifest)[0]  # rank 0's, as written (the others measured their own seconds)
        if judge_backbone is not backbone:
            # A separate judge (e.g. beside an R1 model) would otherwise stay resident through training.
            del judge_backbone
            release_backbone(self.judge.model)
        return Corpus(self.directory, items, manifest)

    def _engine(self, backbone: Backbone, config: Optional[BackboneConfig] = None) -> VllmEngine:
        """A vLLM engine on ``backbone``'s weights (the judge's when ``config`` names them), started at its first
        request: a rerun with every stage done starts none."""
        return VllmEngine(backbone, config or self.backbone_config)

    def _reused_stage_facts(self, hashes: dict, measured: dict, world: int) -> tuple[dict, dict]:
        """Seconds and world size per stage, kept as recorded for stages that a rerun found done (not redone).

        So a rerun that regenerates nothing, with any number of ranks, writes the same manifest (left untouched).
        """
        path = self.directory / "manifest.json"
        try:
            previous = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            previous = {}
        old_hashes, old_seconds = previous.get("stages", {}), previous.get("seconds", {})
        old_worlds = previous.get("world_size", {})
        reused = {k for k in hashes if old_hashes.get(k) == hashes[k]}
        seconds = {k: old_seconds[k] if k in reused and k in old_seconds else v for k, v in measured.items()}
        # A manifest written before sharding existed records no world size: its stages ran in one process.
        worlds = {k: old_worlds.get(k, 1) if k in reused else world for k in hashes}
        return seconds, worlds

    def _intent_free_configs(self) -> tuple[dict, dict]:
        """Query and judge configs without the intent protocol's fields, which enter a hash only when it is on
        (so corpora built before it existed keep their hashes)."""
        queries = {k: v for k, v in asdict(self.queries).items() if k != "knowledge_every"}
        judge = {k: v for k, v in asdict(self.judge).items() if k != "intent_scorer"}
        return queries, judge

    def _manifest(self, backbone: Backbone, judge_backbone: Backbone, hashes: dict, queries: list[dict],
                  items: list[dict], stats: dict, timings: dict) -> dict:
        per_persona = {}
        for name in self.registry.names:
            mine = [i for i in items if i["persona"] == name]
            per_persona[name] = {"queries": len(mine), "distill": sum(i["label"] for i in mine)}
        distill = sum(i["label"] for i in items)
        queries_config, judge_config = self._intent_free_configs()
        return {
            "format_version": FORMAT_VERSION,
            "model": backbone.reference,
            "config_hash": stable_hash(self.backbone_config, self.registry.names, queries_config,
                                       self.answers, judge_config, self.placement,
                                       *([{"samples": self.samples}] if self.samples > 1 else []),
                                       *([{"intent": [self.knowledge_every(), self.judge.intent_scorer]}]
                                         if self.judge.protocol == "intent" else [])),
            "stages": hashes,
            # HF manifests keep their old keys.
            **({"engine": self.engine} if self.engine != "hf" else {}),
            **({"scoring_engine": self.scoring_engine} if self.scoring_engine != self.engine else {}),
            "placement": self.placement,
            "answer_mode": self.answers.mode,
            "personas": {p.name: p.text for p in self.registry},
            "categories": {p.name: p.category for p in self.registry},
            "kinds": {p.name: p.kind for p in self.registry},
            "placements": {p.name: p.placement for p in self.registry if p.placement},
            "counts": {"queries": len(queries), "distill": distill, "retain": len(items) - distill},
            "per_persona": per_persona,
            "judge": {"protocol": self.judge.protocol, "margin": self.judge.margin,
                      "model": judge_backbone.reference, **stats},
            "seconds": {k: round(v, 1) for k, v in timings.items()},
        }
