"""Write `prism predict` outputs to JSONL: rows appended as batches finish, the file moved into place at the end."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

from lightning.pytorch.callbacks import BasePredictionWriter

from prism_lightning.jsonl import JsonlSink


class PredictionWriter(BasePredictionWriter):
    """Appends ``{"id", "prompt", "text", "route", "probability", ...}`` rows to ``<output>.partial`` after each
    batch and renames it to ``output`` when prediction ends, so a failed run never leaves an older file looking
    like this run's output.

    Args:
        output: JSONL path; default ``<default_root_dir>/predictions.jsonl``.
    """

    def __init__(self, output: Optional[str] = None) -> None:
        super().__init__(write_interval="batch")
        self.output = output

    def path(self, trainer: Any) -> Path:
        """Where the finished predictions go."""
        return Path(self.output or Path(trainer.default_root_dir) / "predictions.jsonl")

    def partial(self, trainer: Any) -> Path:
        """Where rows go while the run is in progress."""
        path = self.path(trainer)
        return path.with_name(path.name + ".partial")

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        """Start from an empty in-progress file."""
        if trainer.is_global_zero:
            self.partial(trainer).unlink(missing_ok=True)

    def write_on_batch_end(self, trainer: Any, pl_module: Any, prediction: Sequence[dict],
                           batch_indices: Optional[Sequence[int]], batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        """Append this batch's rows."""
        JsonlSink(self.partial(trainer)).append(list(prediction))

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        """Move the finished file into place."""
        if trainer.is_global_zero and self.partial(trainer).is_file():
            os.replace(self.partial(trainer), self.path(trainer))
