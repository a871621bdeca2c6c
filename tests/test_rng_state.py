"""Random state in checkpoints: one per rank, restored to the rank it came from, older single-state files read."""

from __future__ import annotations

import random

import torch

from prism_lightning.distributed import rng_state


def draw() -> tuple[list[float], float]:
    return torch.rand(4).tolist(), random.random()


def test_a_captured_state_replays_the_same_draws():
    saved = rng_state.capture_all_ranks()
    assert len(saved["ranks"]) == 1  # one process: one rank
    first = draw()
    assert rng_state.restore(saved, rank=0, world=1) is None
    assert draw() == first


def test_each_rank_gets_its_own_state_back():
    torch.manual_seed(1)
    random.seed(1)
    rank0 = rng_state.capture()
    torch.manual_seed(2)
    random.seed(2)
    rank1 = rng_state.capture()
    expected = draw()
    rng_state.restore({"ranks": [rank0, rank1]}, rank=1, world=2)
    assert draw() == expected


def test_a_checkpoint_from_before_per_rank_state_still_restores():
    old = rng_state.capture()  # the former layout: one state at the top level
    expected = draw()
    assert rng_state.restore(old, rank=0, world=1) is None
    assert draw() == expected


def test_a_different_world_size_is_said_in_one_line_and_changes_nothing():
    saved = {"ranks": [rng_state.capture(), rng_state.capture()]}
    before = torch.get_rng_state()
    problem = rng_state.restore(saved, rank=0, world=4)
    assert "2 rank(s), this run has 4" in problem and "\n" not in problem
    assert torch.equal(torch.get_rng_state(), before)
    assert rng_state.restore(None, rank=0, world=4) is None
