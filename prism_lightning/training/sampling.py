"""Training samplers and the loader that resumes mid-epoch: each rank's share of a seeded draw, continued after a kill.

A checkpoint written inside an epoch (Slurm requeue, ``every_n_train_steps``) records the epoch and how many batches
of it this rank trained on; the resumed run skips exactly those indices of the same seeded draw, so it trains on
the batches the uninterrupted run would have, not the epoch's first batches a second time.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import DataLoader, DistributedSampler


class _ResumableSampler:
    """Mixin for a ``DistributedSampler`` subclass: one pending resume point, applied to the epoch it names."""

    epoch: int
    _resume_at: Optional[tuple[int, int]] = None
    skipped: int = 0  # indices left out at the start of the current iteration

    def resume_at(self, epoch: int, start: int) -> None:
        """Begin the next iteration of ``epoch`` at index ``start`` of this rank's share."""
        self._resume_at = (epoch, start)

    def _resumed(self, indices: list[int]) -> Iterator[int]:
        """This rank's share, less what a checkpoint already trained on (once, and only in the epoch it names)."""
        epoch, start = self._resume_at or (self.epoch, 0)
        self._resume_at = None
        self.skipped = start if epoch == self.epoch else 0
        return iter(indices[self.skipped:])


class BalancedSampler(_ResumableSampler, DistributedSampler):
    """Draws indices with replacement so both gate classes are equally likely (minority resampling); one share per rank.

    Each epoch draws one global sample of ``ceil(n / world) * world`` indices from a generator seeded with the seed and
    the epoch, identical on every rank, and rank r takes every ``world``-th index from position r. So the ranks train on
    different draws, every rank re-draws each epoch (Lightning calls ``set_epoch`` on every rank), a resumed run draws
    what an uninterrupted one would, and one process draws exactly what it always did. It is a
    ``DistributedSampler``, so Lightning uses it as it is: a wrapper would reshuffle the draw and never hand
    ``set_epoch`` down to it.
    """

    def __init__(self, labels: list[int], seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        # DistributedSampler.__init__ would ask torch.distributed for the world, which may not exist yet: given here.
        if not 0 <= rank < num_replicas:
            raise ValueError(f"BalancedSampler: rank {rank} outside 0..{num_replicas - 1}")
        counts = {lab: labels.count(lab) for lab in set(labels)}
        self.weights = torch.tensor([1.0 / counts[lab] for lab in labels], dtype=torch.double)
        self.seed, self.epoch = seed, 0
        self.num_replicas, self.rank = num_replicas, rank
        self.num_samples = math.ceil(len(labels) / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.shuffle, self.drop_last = True, False  # what readers of a DistributedSampler look at

    def set_epoch(self, epoch: int) -> None:
        """Choose the draw for this epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        draw = torch.multinomial(self.weights, self.total_size, True, generator=generator).tolist()
        return self._resumed(draw[self.rank::self.num_replicas])


class ShuffledSampler(_ResumableSampler, DistributedSampler):
    """torch's ``DistributedSampler`` (shuffled, seeded per epoch) that can resume mid-epoch."""

    def __iter__(self) -> Iterator[int]:
        return self._resumed(list(super().__iter__()))


class ResumableLoader(DataLoader):
    """A training ``DataLoader`` whose ``state_dict`` Lightning saves in every checkpoint and restores on resume.

    The state is (epoch, batches handed to the training loop in it). The count is exact because the loader has a
    length, so Lightning fetches each batch just when it trains on it (it prefetches only unsized loaders); worker
    processes read ahead inside the iterator, below the count.
    """

    sampler: _ResumableSampler

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, _ResumableSampler):
            raise TypeError(f"ResumableLoader needs a resumable sampler, got {type(self.sampler).__name__}")
        self._served = 0

    def __iter__(self) -> Iterator[Any]:
        self._served = 0
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Where this rank is: the sampler's epoch and the batches of it already trained on (skipped ones included)."""
        return {"epoch": self.sampler.epoch, "batches": self.sampler.skipped // self.batch_size + self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue the saved epoch after its trained batches (Lightning calls this only for a mid-epoch resume)."""
        self.sampler.resume_at(int(state["epoch"]), int(state["batches"]) * self.batch_size)
