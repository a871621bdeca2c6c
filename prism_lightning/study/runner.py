"""Run the study's cells on the base model: suites loaded and checked first, each cell stored when done, resumable."""

from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
from rich.console import Console
from rich.table import Table

from prism_lightning.contexts.domains import DOMAINS
from prism_lightning.contexts.personas import PersonaConfig, PersonaRegistry
from prism_lightning.evaluation import mmlu
from prism_lightning.evaluation.benchmark import BenchmarkConfig, BenchmarkRun
from prism_lightning.evaluation.benchmarks import MT_BENCH_PERSONA
from prism_lightning.evaluation.cache import CachedGatedModel
from prism_lightning.evaluation.stats import bootstrap_interval
from prism_lightning.evaluation.suites import SAFETY_PERSONA, SuiteResult, run_mmlu, run_mt_bench, run_safety
from prism_lightning.inference.gated_model import BASE
from prism_lightning.model.backbone import Backbone, BackboneConfig, load_backbone
from prism_lightning.model.chat import ChatFormatter, template_fingerprint
from prism_lightning.model.generation import DecodingConfig, generate_batch, length_batches, token_logprobs
from prism_lightning.study.analysis import analyse
from prism_lightning.study.cells import SUITES, Cell, cells, check_config, conditions
from prism_lightning.study.config import StudyConfig
from prism_lightning.study.judge_checks import study_judge_controls
from prism_lightning.study.report import print_effects, write_study
from prism_lightning.utils.jsonl import JsonlSink
from prism_lightning.utils.progress import announce


# 2: every safety set scored by string match and by the judge (subcategories "Safety/<set> (strings|judge)").
CELL_FORMAT = 2


class BaseModelFront:
    """The evaluation front (``prompt_ids``, ``routes``, ``generate_ids``, ``token_logprobs``) of the base model
    alone: the study measures what a persona does to the untouched model, so every route is ``base``."""

    threshold = float("nan")

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone
        self.model = backbone.model
        self.formatter = ChatFormatter(backbone.tokenizer)

    def _off(self):
        """An adapter another module injected into the shared backbone stays off."""
        return self.backbone.adapter.disable_adapter() if self.backbone.adapter is not None else nullcontext()

    def routes(self, prompt_ids: Sequence[Sequence[int]], route: str = "base",
               batch_size: int = 16) -> tuple[list[str], torch.Tensor]:
        """Every row on the base model; no gate ran, so no probability."""
        if route != "base":
            raise ValueError(f"the study runs the base model only, not route {route!r}")
        return [BASE] * len(prompt_ids), torch.full((len(prompt_ids),), float("nan"))

    def prompt_ids(self, prompt: str, persona: Optional[str] = None, history: Sequence[tuple[str, str]] = (),
                   placement: Optional[str] = None) -> list[int]:
        """Chat-formatted prompt ids with the persona placed as asked."""
        return self.formatter.prompt_ids(prompt, persona, placement, history=history)

    @torch.no_grad()
    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], decoding: DecodingConfig = DecodingConfig(),
                     route: str = "base") -> list[dict]:
        """Generation in batches of similar length, in input order."""
        self.routes(prompt_ids, route)
        out: list[Optional[dict]] = [None] * len(prompt_ids)
        with self._off():
            for index in length_batches(prompt_ids, decoding.batch_size):
                results = generate_batch(self.backbone, [list(prompt_ids[i]) for i in index], decoding,
                                         seed=decoding.seed + index[0])
                for i, r in zip(index, results):
                    out[i] = {**r, "probability": None, "route": "base"}
        return out

    @torch.no_grad()
    def token_logprobs(self, prompt_ids: Sequence[Sequence[int]], tokens: Optional[Sequence[int]] = None,
                       route: str = "base", batch_size: int = 16, tail: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs of ``tokens`` after the last ``tail`` positions of each prompt, in input order."""
        self.routes(prompt_ids, route)
        width = len(tokens) if tokens is not None else len(self.backbone.tokenizer)
        out = torch.zeros(len(prompt_ids), tail, width)
        with self._off():
            for index in length_batches(prompt_ids, batch_size):
                out[index] = token_logprobs(self.model, self.backbone.tokenizer.pad_token_id, self.backbone.device,
                                            [list(prompt_ids[i]) for i in index], tokens, tail)
        return out, torch.full((len(prompt_ids),), float("nan"))


def _floats(values: torch.Tensor) -> list[Optional[float]]:
    return [None if math.isnan(v) else round(float(v), 6) for v in values.tolist()]


def cell_record(cell: Cell, result: SuiteResult, seconds: float, computed: int, seed: int) -> dict:
    """What the resume file keeps of a finished cell: per-item scores (None = unreadable verdict) and summaries."""
    items = {k: _floats(v) for k, v in result.items.items()}
    intervals = {k: bootstrap_interval(v[~v.isnan()].double(), seed=seed) for k, v in result.items.items()}
    return {"key": cell.key, "suite": cell.suite, "condition": {**asdict(cell.condition), "name": cell.condition.name},
            "scores": result.scores, "counts": result.counts, "unreadable": result.unreadable, "intervals": intervals,
            "items": items, "seconds": round(seconds, 2), "computed": computed}


class StudyRun:
    """The study of one base model: its cells, the resume file, and the evaluation cache shared by every cell."""

    def __init__(self, config: StudyConfig, suites: BenchmarkConfig, backbone: BackboneConfig,
                 run_personas: Sequence[str], directory: Path) -> None:
        control = list(run_personas if config.control_personas is None else config.control_personas)
        control = list(DOMAINS) if control == ["all"] else control
        check_config(config, control)
        self.config, self.directory = config, Path(directory)
        self.suites = replace(suites, preference_n=0)  # no trained system here: nothing to compare with Base
        registry = PersonaRegistry.from_config(PersonaConfig(names=["all"]))
        # Loads and checks every suite file before any model work (bad input: one line naming file and line).
        self.bench = BenchmarkRun(self.suites, registry, [], {})
        self.data = self.bench.data
        self.backbone = load_backbone(backbone)
        self.front = BaseModelFront(self.backbone)
        self.conditions = conditions(config, self.front.formatter, control)
        self.cells = cells(self.conditions, [s for s in SUITES if s in self.data])
        granularities = {c.granularity for c in self.conditions if c.granularity}
        self.registries = {g: PersonaRegistry.from_config(PersonaConfig(names=["all"], granularity=g))
                           for g in granularities}
        self.signature = self._signature()
        self.model = CachedGatedModel(self.front, on_progress=self._progress)
        self._judges = None
        self._computed = 0

    def _signature(self) -> str:
        """Digest of what a cell's result depends on besides its condition: weights, dtype, template, suites."""
        blob = json.dumps({"model": self.backbone.reference, "dtype": self.backbone.config.dtype,
                           "cell_format": CELL_FORMAT,
                           "template": template_fingerprint(self.backbone.tokenizer),
                           "suites": asdict(self.suites)}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def store_path(self) -> Path:
        """The resume file of this model and these suites: one record per finished cell."""
        return self.directory / f"cells-{self.signature}.jsonl"

    def _progress(self, n: int) -> None:
        self._computed += n

    def judges(self):
        """Grading and refusal judges over the configured judge (default: this base model)."""
        if self._judges is None:
            self._judges = self.bench.judge(self.model)
        return self._judges

    def run_cell(self, cell: Cell) -> SuiteResult:
        """Score one condition on one suite."""
        condition, cfg = cell.condition, self.suites
        row = condition.row()
        registry = self.registries.get(condition.granularity) or next(iter(self.registries.values()))
        placement = condition.placement or "system"
        if cell.suite == "mmlu":
            return run_mmlu(self.model, self.data["mmlu"], row, registry, cfg.batch_size, placement=placement)
        grader, refusal, _, _ = self.judges()
        if cell.suite == "mt_bench":
            return run_mt_bench(self.model, self.data["mt_bench"], row, registry, grader, cfg.decoding,
                                placement=placement)
        return run_safety(self.model, self.data["safety"], row, registry, refusal,
                          replace(cfg.decoding, max_new_tokens=cfg.safety_max_new_tokens), placement=placement)

    def run(self) -> list[dict]:
        """Every cell not already in the resume file, each appended when done; returns all records in cell order."""
        sink = JsonlSink(self.store_path, key="key")
        done = sum(1 for c in self.cells if c.key in sink)
        announce("study", f"{len(self.cells)} cells ({len(self.conditions)} conditions x "
                          f"{len(self.cells) // len(self.conditions)} suites); {done} already done in {self.store_path}")
        for number, cell in enumerate(self.cells, 1):
            if cell.key in sink:
                continue
            start, self._computed = time.perf_counter(), 0
            result = self.run_cell(cell)
            seconds = time.perf_counter() - start
            sink.append([cell_record(cell, result, seconds, self._computed, self.suites.seed)])
            announce(f"study {number}/{len(self.cells)}", f"{cell.suite} · {cell.condition.name}: "
                                                           f"{self._computed} prompts computed, {seconds:.1f}s")
        return [sink.get(c.key) for c in self.cells]

    def finish(self, records: Sequence[dict]) -> dict:
        """Analyse the cells, print the effect table, write study.json, figures and report.md."""
        study = analyse(records, self.conditions, self.config, self.suites.seed)
        judge = self.suites.judge.name_or_path if self.suites.judge else "self (the base model)"
        study.update({"model": self.backbone.config.name_or_path, "fingerprint": self.backbone.fingerprint,
                      "signature": self.signature, "seconds": round(sum(r["seconds"] for r in records), 1),
                      "condition_details": [{**asdict(c), "name": c.name} for c in self.conditions],
                      "settings": {"dtype": self.backbone.config.dtype, "judge": judge,
                                   "decoding": asdict(self.suites.decoding),
                                   "safety_max_new_tokens": self.suites.safety_max_new_tokens,
                                   "mmlu_n": self.suites.mmlu_n, "mt_bench_n": self.suites.mt_bench_n,
                                   "safety_n": self.suites.safety_n, "seed": self.suites.seed,
                                   "granularities": self.config.granularities,
                                   "placements": self.config.placements,
                                   "control_granularity": self.config.control_granularity}})
        grader, refusal, _, _ = self.judges()
        registry = self.registries.get("full") or next(iter(self.registries.values()))
        study["judge_controls"] = study_judge_controls(self.model, self.data, grader, refusal, registry,
                                                       self.suites.decoding, self.suites.judge_controls,
                                                       self.suites.seed)
        print_effects(study)
        write_study(study, self.directory)
        announce("study", f"wrote {self.directory / 'study.json'}, report.md and figures")
        return study

    def plan(self) -> dict:
        """Cells and an estimate of prompts and tokens, from the suites alone (nothing runs)."""
        cfg, rows = self.suites, []
        safety_tokens = cfg.safety_max_new_tokens
        unique: set = set()
        for cell in self.cells:
            row, placement = cell.condition.row(), cell.condition.placement or "system"
            registry = self.registries.get(cell.condition.granularity) or next(iter(self.registries.values()))
            prompts = self._first_prompts(cell, row, registry, placement)
            unique.update(tuple(p) for p in prompts)
            if cell.suite == "mmlu":
                generated, judged, new = 0, 0, 0
            elif cell.suite == "mt_bench":
                turns = sum(len(q["turns"][:2]) for q in self.data["mt_bench"])
                generated, judged, new = turns, turns, turns * cfg.decoding.max_new_tokens
            else:
                generated = judged = len(prompts)
                new = generated * safety_tokens
            prompt_tokens = sum(len(p) for p in prompts)
            # Judge prompts repeat the question and answer: about the prompt tokens plus the new tokens again.
            rows.append({"cell": cell.key, "scored": len(prompts) if cell.suite == "mmlu" else 0,
                         "generated": generated, "judged": judged,
                         "tokens": prompt_tokens + 2 * new + (prompt_tokens if judged else 0)})
        return {"cells": rows, "conditions": len(self.conditions), "unique_first_prompts": len(unique),
                "done": self._done()}

    def _done(self) -> int:
        """Cells already in the resume file (none when there is no file yet; the dry run creates nothing)."""
        if not self.store_path.exists():
            return 0
        sink = JsonlSink(self.store_path, key="key")
        return sum(1 for c in self.cells if c.key in sink)

    def _first_prompts(self, cell: Cell, row, registry: PersonaRegistry, placement: str) -> list[list[int]]:
        """The prompts a cell sends before any model output exists (MMLU, turn 1, safety)."""
        fmt = self.front.formatter
        if cell.suite == "mmlu":
            return [fmt.prompt_ids(mmlu.prompt_text(r), row.persona_text(
                registry, mmlu.CATEGORY_PERSONA[mmlu.SUBJECT_CATEGORY[r["subject"]]]), placement)
                for r in self.data["mmlu"]]
        if cell.suite == "mt_bench":
            return [fmt.prompt_ids(q["turns"][0], row.persona_text(registry, MT_BENCH_PERSONA.get(q["category"])),
                                   placement) for q in self.data["mt_bench"]]
        text = row.persona_text(registry, SAFETY_PERSONA)
        return [fmt.prompt_ids(p["prompt"], text, placement) for prompts in self.data["safety"].values()
                for p in prompts]


def print_plan(plan: dict, console: Optional[Console] = None) -> None:
    """The dry run's table: per cell what would run, then the totals."""
    console = console or Console(width=None if Console().is_terminal else 160)
    table = Table(title=f"prism study --study.dry_run: {len(plan['cells'])} cells, {plan['conditions']} conditions "
                        f"({plan['done']} already done)")
    for column in ("cell", "scored", "generated", "judged", "≈ tokens"):
        table.add_column(column, justify="left" if column == "cell" else "right")
    for row in plan["cells"]:
        table.add_row(row["cell"], *(str(row[k]) for k in ("scored", "generated", "judged", "tokens")))
    totals = {k: sum(r[k] for r in plan["cells"]) for k in ("scored", "generated", "judged", "tokens")}
    table.add_row("total", *(str(totals[k]) for k in ("scored", "generated", "judged", "tokens")), style="bold")
    console.print(table)
    console.print(f"{plan['unique_first_prompts']} distinct first prompts across cells (the evaluation cache computes "
                  f"each once); tokens count prompts, generations at their cap and judge prompts.")
