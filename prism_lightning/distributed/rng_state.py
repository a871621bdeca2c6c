"""Random state in checkpoints, one per rank, so a resumed run draws the dropout masks an uninterrupted one would.

Every rank starts from the same seed but consumes random numbers in proportion to its own batches' shapes, so
after a few steps the ranks' generators differ; restoring rank 0's state everywhere would make them draw alike.
"""

from __future__ import annotations

import random
from typing import Any, Optional

import torch

from prism_lightning.distributed.collectives import all_gather_objects


def capture() -> dict[str, Any]:
    """This process's generators: torch CPU, the current CUDA device's (when in use), and Python's."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def capture_all_ranks() -> dict[str, Any]:
    """Every rank's state in rank order (a collective: Lightning builds a checkpoint's contents on every rank)."""
    return {"ranks": all_gather_objects(capture())}


def restore(saved: Optional[dict[str, Any]], rank: int, world: int) -> Optional[str]:
    """Set this rank's generators from a checkpoint; a one-line reason when they cannot be restored exactly."""
    if not saved:
        return None
    ranks = saved.get("ranks", [saved])  # checkpoints before per-rank state held one state at the top level
    if len(ranks) != world:
        return (f"the checkpoint holds random state for {len(ranks)} rank(s), this run has {world}: dropout masks "
                f"after the resume differ from an uninterrupted run's")
    state = ranks[rank]
    torch.set_rng_state(state["torch"])
    version, _, gauss = random.getstate()
    random.setstate((version, tuple(state["python"]), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return None
