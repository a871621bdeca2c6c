"""Write `prism predict` outputs to JSONL: rows appended as batches finish, the file moved into place at the end."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

from lightning.pytorch.callbacks import BasePredictionWriter

from prism_lightning.utils.jsonl import append_jsonl, read_jsonl, write_jsonl

INDEX = "_index"  # a row's position in the prompt file, kept in the per-rank files only


class PredictionWriter(BasePredictionWriter):
    """Appends ``{"id", "prompt", "text", "route", "probability", ...}`` rows to ``<output>.partial`` after each
    batch and renames it to ``output`` when prediction ends, so a failed run never leaves an older file looking
    like this run's output.

    On several processes each rank predicts its share of the prompts (Lightning's unrepeated distributed sampler)
    into ``<output>.rank<R>.partial``; at the end rank 0 merges the shares in prompt-file order.

    Args:
        output: JSONL path; default ``<default_root_dir>/predictions.jsonl``.
    """

    def __init__(self, output: Optional[str] = None) -> None:
        super().__init__(write_interval="batch")
        self.output = output

    def path(self, trainer: Any) -> Path:
        """Where the finished predictions go."""
        return Path(self.output or Path(trainer.default_root_dir) / "predictions.jsonl")

    def partial(self, trainer: Any, rank: Optional[int] = None) -> Path:
        """Where this rank's (or ``rank``'s) rows go while the run is in progress."""
        path = self.path(trainer)
        if trainer.world_size == 1:
            return path.with_name(path.name + ".partial")
        return path.with_name(f"{path.name}.rank{trainer.global_rank if rank is None else rank}.partial")

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        """Start from an empty in-progress file (each rank its own: no rank deletes another's rows)."""
        self.partial(trainer).unlink(missing_ok=True)

    def write_on_batch_end(self, trainer: Any, pl_module: Any, prediction: Sequence[dict],
                           batch_indices: Optional[Sequence[int]], batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        """Append this batch's rows (with their prompt-file positions when several ranks share the prompts)."""
        rows = list(prediction)
        if trainer.world_size > 1:
            if batch_indices is None or len(batch_indices) != len(rows):
                raise RuntimeError("PredictionWriter: Lightning gave no prompt indices for this batch")
            rows = [{**row, INDEX: int(i)} for row, i in zip(rows, batch_indices)]
        append_jsonl(self.partial(trainer), rows)

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        """Move the finished file into place; on several ranks, merge their files once all have finished."""
        if trainer.world_size == 1:
            if self.partial(trainer).is_file():
                os.replace(self.partial(trainer), self.path(trainer))
            return
        trainer.strategy.barrier("prediction_writer")
        if not trainer.is_global_zero:
            return
        shares = [self.partial(trainer, rank) for rank in range(trainer.world_size)]
        rows = sorted((row for share in shares if share.is_file() for row in read_jsonl(share)),
                      key=lambda row: row[INDEX])
        write_jsonl(self.path(trainer), [{k: v for k, v in row.items() if k != INDEX} for row in rows])
        for share in shares:
            share.unlink(missing_ok=True)
