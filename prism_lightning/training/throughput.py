"""Batch sizes for Lightning's ``ThroughputMonitor``: rows and tokens of a PRISM training batch.

Add the monitor from the command line (it logs ``train/time``, ``train/samples``, ``train/lengths`` and per-device
rates to the run's logger)::

    prism fit ... --trainer.callbacks+=lightning.pytorch.callbacks.ThroughputMonitor \\
        --trainer.callbacks.batch_size_fn=prism_lightning.training.throughput.batch_rows \\
        --trainer.callbacks.length_fn=prism_lightning.training.throughput.batch_tokens
"""

from __future__ import annotations

from typing import Any


def batch_rows(batch: dict[str, Any]) -> int:
    """Corpus items in a training batch."""
    return len(batch["ids"])


def batch_tokens(batch: dict[str, Any]) -> int:
    """Tokens a training step runs forward: the student's and the persona teacher's, padding left out."""
    return int(batch["student_mask"].sum()) + int(batch["teacher_mask"].sum())
