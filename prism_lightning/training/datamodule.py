"""BootstrapDataModule: builds or reuses the corpus, splits it, and collates aligned student/teacher batches."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from prism_lightning.bootstrap.config import AnswerConfig, JudgeConfig, LabelConfig, QueryConfig
from prism_lightning.bootstrap.corpus import Corpus, CorpusBuilder, check_both_classes, load_corpus
from prism_lightning.contexts.personas import PersonaConfig, PersonaRegistry
from prism_lightning.distributed.sharding import Shard
from prism_lightning.evaluation.benchmark import BenchmarkConfig, BenchmarkRun
from prism_lightning.model.adapters import adapter_of
from prism_lightning.model.backbone import BackboneConfig, load_backbone
from prism_lightning.model.chat import ChatFormatter, Placement
from prism_lightning.model.gate_mlp import soft_targets
from prism_lightning.model.generation import right_pad
from prism_lightning.model.prefix_states import shared_prefix_len
from prism_lightning.model.vllm_engine import VllmEngine, check_vllm_settings
from prism_lightning.training.sampling import BalancedSampler, ResumableLoader, ShuffledSampler
from prism_lightning.training.teacher_cache import TeacherCache, TeacherMode, build_teacher_cache, item_key
from prism_lightning.training.teacher_text import TeacherText, teacher_placements, teacher_texts
from prism_lightning.utils.checks import check_data
from prism_lightning.utils.errors import PrismError
from prism_lightning.utils.jsonl import read_jsonl_numbered
from prism_lightning.utils.paths import InputFile
from prism_lightning.utils.progress import announce


def stratified_split(items: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split keeping the label ratio in both parts; at least one item of each class in val when possible."""
    rng = random.Random(seed)
    train, val = [], []
    for label in (0, 1):
        group = [i for i in items if i["label"] == label]
        rng.shuffle(group)
        n_val = min(len(group) - 1, max(1, round(len(group) * val_fraction))) if len(group) > 1 else 0
        val += group[:n_val]
        train += group[n_val:]
    return train, val


@dataclass
class Collator:
    """Tokenizes items into right-padded student (no persona) and teacher (persona) inputs on identical responses."""

    formatter: ChatFormatter
    persona_texts: dict[str, str]
    max_length: int = 512
    teacher_cache: Optional[TeacherCache] = None  # adds the distill rows' cached teacher top-k to each batch
    placements: dict[str, str] = field(default_factory=dict)  # contexts whose kind fixes a placement
    adapter_of: dict[str, int] = field(default_factory=dict)  # context -> adapter index (K-way; empty: one adapter)
    _prefixes: dict[tuple, list[int]] = field(default_factory=dict, init=False, repr=False)

    def encode_item(self, item: dict) -> dict:
        """Student and teacher encodings of one item; retain items use the baseline answer and no persona."""
        distill = item["label"] == 1
        response = item["persona_answer"] if distill else item["baseline_answer"]
        persona = self.teacher_text(item["target_persona"]) if distill else None
        placement = self.placements.get(item["target_persona"]) if distill else None
        student = self.formatter.encode(item["query"], response)
        teacher = self.formatter.encode(item["query"], response, persona, placement)
        room = self.max_length - max(student.prompt_len, teacher.prompt_len)
        if room < 1:
            raise PrismError(f"item {item['id']}: prompt longer than data.max_length={self.max_length}; raise it")
        n_resp = min(len(student.response_ids), room)
        # The teacher's persona block is shared by every item of the persona: its keys/values are computed once.
        prefix = self.context_prefix(persona, placement)
        shared = shared_prefix_len(teacher.input_ids, prefix, teacher.prompt_len - 1)
        return {"student": student.input_ids[:student.prompt_len + n_resp], "s_start": student.prompt_len,
                "teacher": teacher.input_ids[:teacher.prompt_len + n_resp], "t_start": teacher.prompt_len,
                "t_prefix": shared, "n_resp": n_resp, "label": float(item["label"]), "id": item["id"],
                "route": 1 + self.adapter_of.get(item["target_persona"], 0) if distill else 0,
                "soft_route": self.soft_route(item)}

    def soft_route(self, item: dict) -> list[float]:
        """The item's (none, adapter 1..K) target from its win probabilities; a corpus without them: its label."""
        outputs = 1 + max(self.adapter_of.values(), default=0)
        per_persona = item.get("win_probs") or {item.get("target_persona"): item.get("win_prob", float(item["label"]))}
        per_adapter: dict[int, float] = {}
        for name, p in per_persona.items():
            k = self.adapter_of.get(name, 0)
            per_adapter[k] = max(per_adapter.get(k, 0.0), p)
        return soft_targets(per_adapter, outputs)

    def context_prefix(self, persona: Optional[str], placement: Optional[str] = None) -> list[int]:
        """The formatter's prefix for this persona and placement, computed once per collator."""
        key = (persona, placement)
        if key not in self._prefixes:
            self._prefixes[key] = self.formatter.context_prefix(persona, placement)
        return self._prefixes[key]

    def teacher_text(self, name: str) -> str:
        """The teacher's persona text; an unknown name is an error, never a persona-less (KL = 0) teacher."""
        try:
            return self.persona_texts[name]
        except KeyError:
            raise PrismError(f"unknown target persona {name!r}; known: {', '.join(self.persona_texts)}") from None

    def __call__(self, items: list[dict]) -> dict[str, Any]:
        enc = [self.encode_item(i) for i in items]
        pad = self.formatter.tokenizer.pad_token_id
        r = max(e["n_resp"] for e in enc)

        steps = torch.arange(r)
        resp_mask = torch.stack([steps < e["n_resp"] for e in enc])
        # The logit at position p predicts token p + 1, so response token t is predicted at start + t - 1.
        s_pos = torch.stack([(e["s_start"] - 1 + steps).clamp(max=len(e["student"]) - 1) for e in enc])
        t_pos = torch.stack([(e["t_start"] - 1 + steps).clamp(max=len(e["teacher"]) - 1) for e in enc])
        s_ids, s_mask = right_pad([e["student"] for e in enc], pad)
        t_ids, t_mask = right_pad([e["teacher"] for e in enc], pad)
        batch = {"student_ids": s_ids, "student_mask": s_mask, "teacher_ids": t_ids, "teacher_mask": t_mask,
                 "student_pos": s_pos, "teacher_pos": t_pos, "response_mask": resp_mask,
                 "teacher_prefix": torch.tensor([e["t_prefix"] for e in enc]),
                 "feature_pos": torch.tensor([e["s_start"] - 1 for e in enc]),
                 "label": torch.tensor([e["label"] for e in enc]), "ids": [e["id"] for e in enc],
                 "route": torch.tensor([e["route"] for e in enc]),
                 "soft_route": torch.tensor([e["soft_route"] for e in enc])}
        if self.teacher_cache is not None:
            batch.update(self.cached_targets(enc, r))
        return batch

    def cached_targets(self, enc: list[dict], width: int) -> dict[str, torch.Tensor]:
        """The distill rows' cached teacher top-k, [B, R, k] raw logits and indices (zeros on retain rows)."""
        rows = {n: self.teacher_cache.targets(item_key(e["id"], e["teacher"], e["n_resp"]))
                for n, e in enumerate(enc) if e["label"] > 0.5}
        k = next(iter(rows.values()))[0].shape[-1] if rows else 1
        values = torch.zeros(len(enc), width, k)
        index = torch.zeros(len(enc), width, k, dtype=torch.long)
        for n, (v, i) in rows.items():
            values[n, :v.shape[0]], index[n, :i.shape[0]] = v, i
        return {"teacher_values": values, "teacher_index": index}


class BootstrapDataModule(L.LightningDataModule):
    """The bootstrapped corpus (PRISM stages 1–3) as train/val dataloaders.

    Args:
        backbone: the base model that writes, answers and judges (linked to ``model.backbone``).
        personas: which personas/contexts to distill.
        queries: stage 1 settings.
        answers: stage 2 settings.
        judge: stage 3 settings.
        labels: judged pairs per query (``samples``): the label becomes a win probability whose reliability is
            measured.
        placement: where the persona goes: ``system`` message or prepended to the ``user`` turn.
        corpus_dir: corpus location; default ``<trainer.default_root_dir>/corpus``.
        val_fraction: stratified held-out share for gate metrics.
        batch_size: items per training batch.
        max_length: tokens per sequence (responses are cut to fit).
        balance: resample the minority gate class in training (paper: minority resampling).
        seed: split and sampler seed.
        bootstrap: run or resume stages 1–3 before training; false uses ``corpus_dir`` exactly as it is.
        predict_file: JSONL of ``{"prompt": ...}`` rows for ``prism predict``.
        teacher_text: ``corpus`` (the persona texts recorded with the corpus; a differing config text is an
            error) or ``config`` (distil the configured texts anyway, logged).
        benchmark: what ``prism test`` evaluates (MMLU, MT-Bench, safety sets, preference).
        teacher: ``online`` (the teacher forward runs in every training step) or ``cached`` (each distill item's
            teacher top-k is computed once, before training, into a resumable stage file beside the corpus; a
            step then costs about a plain LoRA step). The loss is the same either way.
        teacher_top_k: the k the cache keeps (linked from ``model.top_k``; 0 = full vocabulary, which ``cached``
            refuses).
        adapters: K-way PRISM: adapter name -> the contexts it distils (each context in one); the gate learns none
            vs which adapter. Empty (default): one adapter for every context, binary PRISM.
        engine: what generates in stages 1 and 2: ``hf`` (transformers) or ``vllm`` (one process; in the
            environment scripts/install-vllm.sh builds). Training always runs on transformers.
        scoring_engine: what computes the judge's log-probs (stage 3) and the teacher cache: ``hf`` or ``vllm``;
            unset = ``engine``. vLLM 0.32 on CPU scores slower than HF (it computes the log-probs of every prompt
            position): ``engine: vllm`` with ``scoring_engine: hf`` is the fast pair there (README, vLLM engine).
    """

    def __init__(self, backbone: BackboneConfig = BackboneConfig(), personas: PersonaConfig = PersonaConfig(),
                 queries: QueryConfig = QueryConfig(), answers: AnswerConfig = AnswerConfig(),
                 judge: JudgeConfig = JudgeConfig(), labels: LabelConfig = LabelConfig(),
                 placement: Placement = "system",
                 corpus_dir: Optional[str] = None, val_fraction: float = 0.2, batch_size: int = 4,
                 max_length: int = 512, balance: bool = True, seed: int = 0, bootstrap: bool = True,
                 predict_file: Optional[InputFile] = None, benchmark: BenchmarkConfig = BenchmarkConfig(),
                 teacher_text: TeacherText = "corpus", teacher: TeacherMode = "online",
                 teacher_top_k: int = 64, adapters: Optional[dict[str, list[str]]] = None,
                 engine: Literal["hf", "vllm"] = "hf",
                 scoring_engine: Optional[Literal["hf", "vllm"]] = None) -> None:
        super().__init__()
        self.backbone_config = backbone
        self.persona_config, self.query_config, self.answer_config = personas, queries, answers
        self.judge_config, self.label_config, self.placement = judge, labels, placement
        self.corpus_dir = corpus_dir
        self.val_fraction, self.batch_size, self.max_length = val_fraction, batch_size, max_length
        self.balance, self.seed = balance, seed
        self.bootstrap, self.predict_file = bootstrap, predict_file
        self.benchmark_config = benchmark
        self.teacher_text = teacher_text
        self.teacher, self.teacher_top_k = teacher, teacher_top_k
        self.teacher_cache: Optional[TeacherCache] = None
        self.teacher_texts: dict[str, str] = {}
        self.adapters = dict(adapters or {})
        self.engine = engine
        self.scoring_engine = scoring_engine or engine
        check_data(self, benchmark)
        self.adapter_of = adapter_of(self.adapters, PersonaRegistry.from_config(personas).names)
        self.benchmark: Optional[BenchmarkRun] = None
        self.corpus: Optional[Corpus] = None
        self.train_items: list[dict] = []
        self.val_items: list[dict] = []
        self._train_loader: Optional[ResumableLoader] = None
        self._train_position: Optional[dict[str, int]] = None

    def resolve_corpus_dir(self, root: Optional[str] = None) -> Path:
        """The corpus directory: explicit, else under the trainer's root dir."""
        if self.corpus_dir:
            return Path(self.corpus_dir)
        if root is None:
            root = self.trainer.default_root_dir if self.trainer is not None else "."
        return Path(root) / "corpus"

    def build_corpus(self, root: Optional[str] = None) -> Corpus:
        """Run or resume stages 1–3 (only the stages whose inputs changed do any work); every rank calls it."""
        builder = CorpusBuilder(self.backbone_config, self.persona_config, self.query_config, self.answer_config,
                                self.judge_config, self.placement, self.resolve_corpus_dir(root), self.label_config,
                                self.engine, self.scoring_engine)
        self.corpus = builder.build()
        return self.corpus

    def setup(self, stage: str) -> None:
        """Build or reuse the corpus (fit only), load it, check both classes exist, and make the stratified split.

        The bootstrap runs here, on every rank, rather than in ``prepare_data`` (one rank while the others wait):
        under DDP / DeepSpeed the ranks share its stages (``bootstrap.sharding``) and all return once the merged
        corpus is on disk. validate/test/predict only read a run: they use the corpus as it is, never rebuild it.
        """
        if stage == "predict":
            return
        if stage == "fit" and self.bootstrap:
            if Shard.current().rank == 0:
                announce("bootstrap", f"stages 1-3 into {self.resolve_corpus_dir()} (finished stages are reused)")
            self.build_corpus()
        self.corpus = load_corpus(self.resolve_corpus_dir())
        check_both_classes(self.corpus, self.judge_config)
        self.teacher_texts = teacher_texts(self.corpus, PersonaRegistry.from_config(self.persona_config),
                                           self.teacher_text)
        self.train_items, self.val_items = stratified_split(self.corpus.items, self.val_fraction, self.seed)
        if stage == "fit" and self.teacher == "cached":
            self.teacher_cache = self.build_teacher_cache()
        if stage == "test":
            # Expert-prompting rows are a baseline: they prompt with every built-in domain's persona (at the run's
            # granularity) whether or not this run distilled it, so no category silently falls back to no persona.
            experts = PersonaRegistry.from_config(replace(self.persona_config, names=["all"]))
            self.benchmark = BenchmarkRun(self.benchmark_config, experts, self.val_items,
                                          self.corpus.manifest.get("judge", {}), self.placement,
                                          self.persona_config.granularity)
        split = {"train": [i["id"] for i in self.train_items], "val": [i["id"] for i in self.val_items]}
        if self.trainer is not None and self.trainer.is_global_zero:
            (self.corpus.directory / "split.json").write_text(json.dumps(split, indent=1))

    def collator(self) -> Collator:
        """The collate function, with this run's tokenizer, placement, persona texts and cached teacher (if any)."""
        tokenizer = load_backbone(self.backbone_config).tokenizer
        return Collator(ChatFormatter(tokenizer, self.placement), self.teacher_texts, self.max_length,
                        self.teacher_cache, teacher_placements(self.corpus) if self.corpus is not None else {},
                        self.adapter_of)

    def build_teacher_cache(self) -> TeacherCache:
        """``teacher: cached``: compute (or finish) the teacher top-k of every distill item, train and held out."""
        collate = self.collator()
        encoded = [collate.encode_item(i) for i in self.train_items + self.val_items if i["label"] == 1]
        if Shard.current().rank == 0:
            announce("teacher cache", f"top-{self.teacher_top_k} teacher targets of {len(encoded)} distill items "
                                      f"(finished ones are reused)")
        backbone = load_backbone(self.backbone_config)
        engine = None
        if self.scoring_engine == "vllm":
            check_vllm_settings(self.engine, self.scoring_engine, Shard.current().world)
            engine = VllmEngine(backbone, self.backbone_config, values="logits", max_logprobs=self.teacher_top_k)
        try:
            return build_teacher_cache(backbone, encoded, self.teacher_top_k, self.resolve_corpus_dir(),
                                       self.batch_size, engine)
        finally:
            if engine is not None:
                engine.close()  # before training: the engine's weights and KV cache are not needed again

    def replicas(self) -> tuple[int, int]:
        """(world size, this process's rank) of the run these loaders feed; (1, 0) outside a Trainer."""
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def train_dataloader(self) -> DataLoader:
        """Training batches, this rank's share; the minority gate class is resampled so both classes are seen equally.

        Both samplers are distributed samplers of our own, so Lightning never wraps or replaces them
        (``use_distributed_sampler`` makes no difference) and every rank runs the same number of batches; the loader
        is stateful, so a checkpoint taken inside an epoch resumes at the next batch of the same draw.
        """
        world, rank = self.replicas()
        if self.balance:
            sampler = BalancedSampler([i["label"] for i in self.train_items], self.seed, world, rank)
        else:
            sampler = ShuffledSampler(self.train_items, world, rank, shuffle=True, seed=self.seed)
        self._train_loader = ResumableLoader(self.train_items, batch_size=self.batch_size, sampler=sampler,
                                             collate_fn=self.collator())
        self._resume_train_loader()
        return self._train_loader

    def state_dict(self) -> dict[str, Any]:
        """The training loader's position (epoch, batches trained), saved in every checkpoint."""
        return {"train_position": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the training loader at the checkpoint's position, now or once it is built.

        Lightning restores a stateful loader itself, except when ``configure_optimizers`` asks for
        ``estimated_stepping_batches`` (ours does, for the LR schedule): the loader is then built before the
        checkpoint is read and its state is dropped (Lightning #20550). The datamodule's own state is always restored.
        """
        self._train_position = state_dict.get("train_position")
        self._resume_train_loader()

    def _resume_train_loader(self) -> None:
        """Hand a restored position to the training loader, once (the sampler applies it to the epoch it names)."""
        if self._train_position and self._train_loader is not None:
            self._train_loader.load_state_dict(self._train_position)
            self._train_position = None

    def val_dataloader(self) -> DataLoader:
        """Held-out batches, in corpus order: rank r gets items r, r + W, …, the last round padded with repeats so
        every rank runs as many batches (the model gathers the shares and drops the repeats)."""
        world, rank = self.replicas()
        sampler = DistributedSampler(self.val_items, world, rank, shuffle=False)
        return DataLoader(self.val_items, batch_size=self.batch_size, sampler=sampler, collate_fn=self.collator())

    def predict_dataloader(self) -> DataLoader:
        """Prompts from ``predict_file`` (one JSON object with a ``prompt`` per line)."""
        if not self.predict_file:
            raise PrismError("data.predict_file: set a JSONL file of {\"prompt\": ...} rows for `prism predict`")
        path = Path(self.predict_file)
        if not path.is_file():
            raise PrismError(f"data.predict_file: file not found: {path}")
        numbered = read_jsonl_numbered(path)
        if not numbered:
            raise PrismError(f"data.predict_file: {path} holds no prompts (expected one {{\"prompt\": ...}} per line)")
        for number, row in numbered:
            if not isinstance(row.get("prompt"), str):
                raise PrismError(f"{path}:{number}: expected a string field \"prompt\"")
        rows = [{"id": str(row.get("id", n)), "prompt": row["prompt"]} for n, (_, row) in enumerate(numbered)]
        return DataLoader(rows, batch_size=self.batch_size, shuffle=False, collate_fn=list)

    def test_dataloader(self) -> DataLoader:
        """Benchmark work units, one per (suite, row); `prism test` reports on them at the end."""
        return DataLoader(self.benchmark.units(), batch_size=None, shuffle=False, collate_fn=lambda unit: unit)
