"""Write `prism predict` outputs to JSONL as batches finish."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from lightning.pytorch.callbacks import BasePredictionWriter

from prism_lightning.jsonl import JsonlSink


class PredictionWriter(BasePredictionWriter):
    """Appends ``{"id", "prompt", "text", "route", "probability", ...}`` rows to ``output`` after each batch.

    Args:
        output: JSONL path; default ``<default_root_dir>/predictions.jsonl``.
    """

    def __init__(self, output: Optional[str] = None) -> None:
        super().__init__(write_interval="batch")
        self.output = output

    def write_on_batch_end(self, trainer: Any, pl_module: Any, prediction: Sequence[dict],
                           batch_indices: Optional[Sequence[int]], batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        """Append this batch's rows (a rerun skips ids already written)."""
        path = Path(self.output or Path(trainer.default_root_dir) / "predictions.jsonl")
        JsonlSink(path).append(list(prediction))
