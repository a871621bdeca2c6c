"""Stages 1–3 across ranks: whole batches of one global plan per rank, a shard file per rank, merged by rank 0.

The plan (every item of a stage, sorted by prompt length, cut into batches) does not depend on the number of
ranks, and batch ``j`` runs on rank ``j mod world``. Each batch therefore has the same members, padding and seed
as in a one-process run, so the merged stage file holds the very records that one process would have written.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar

import torch.distributed as dist

from prism_lightning.utils.errors import PrismError
from prism_lightning.utils.jsonl import JsonlSink, read_jsonl, write_jsonl
from prism_lightning.utils.progress import progress

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """This process's place among the ranks that share the bootstrap (rank 0 of 1 when alone)."""

    rank: int = 0
    world: int = 1

    @staticmethod
    def current() -> "Shard":
        """The rank and world size of the initialised default process group, else a lone process."""
        if dist.is_available() and dist.is_initialized():
            return Shard(dist.get_rank(), dist.get_world_size())
        return Shard()

    def owns(self, batch_index: int) -> bool:
        """Whether batch ``batch_index`` of a plan runs here."""
        return batch_index % self.world == self.rank

    def gather(self, value: Any) -> list:
        """Every rank's ``value``, in rank order."""
        if self.world == 1:
            return [value]
        values: list = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def together(self, action: Callable[[], T]) -> T:
        """Run ``action`` here, then wait for every rank; a failure on one rank stops all of them.

        Without this, the ranks where it went well would wait at the next barrier for one that has died.
        """
        if self.world == 1:
            return action()
        try:
            result, failure = action(), None
        except Exception as exc:  # reported to the other ranks, then raised here unchanged
            result, failure = None, exc
        reports = self.gather(None if failure is None else f"rank {self.rank} failed: {failure}")
        if failure is not None:
            raise failure
        first = next((r for r in reports if r), None)
        if first is not None:
            raise PrismError(f"stopped because {first}")
        return result


def shard_path(path: Path, shard: Shard) -> Path:
    """The file one rank of a world appends to: ``<stage>-<hash>.rank<r>of<w>.jsonl``."""
    return path.with_name(f"{path.stem}.rank{shard.rank}of{shard.world}.jsonl")


def shard_files(path: Path) -> list[Path]:
    """Every shard file of a stage file, of any world size (an interrupted run may have used another)."""
    return sorted(path.parent.glob(f"{path.stem}.rank*of*.jsonl"))


def merge_shards(path: Path, order: Sequence[str] = (), key: str = "id") -> bool:
    """Fold the shard files into the stage file, then delete them; False when there were none.

    The stage file's lines stay first and unchanged; new records follow in ``order`` (the plan's), so a fresh
    sharded stage file is line for line the file one process would have appended.
    """
    shards = shard_files(path)
    if not shards:
        return False
    merged = read_jsonl(path, repair_tail=True)
    seen = {record[key] for record in merged}
    fresh: dict[str, dict] = {}
    for shard in shards:
        for record in read_jsonl(shard, repair_tail=True):
            if record[key] not in seen:
                fresh.setdefault(record[key], record)
    position = {item_id: n for n, item_id in enumerate(order)}
    merged += sorted(fresh.values(), key=lambda r: position.get(r[key], len(position)))
    write_jsonl(path, merged)
    # Deleted only once the merged file is in place: a kill in between leaves duplicates, which readers drop by id.
    for shard in shards:
        shard.unlink(missing_ok=True)
    return True


class ShardedSink(JsonlSink):
    """A stage's result file shared by the ranks: each appends to its own shard and knows every finished record.

    Alone, it appends to the stage file itself (as a ``JsonlSink``); shards that an interrupted multi-rank run
    left behind still count as finished work and are merged in at ``sync``.
    """

    def __init__(self, path: Path, shard: Optional[Shard] = None, key: str = "id") -> None:
        self.stage_path = Path(path)
        self.shard = shard or Shard.current()
        own = self.stage_path if self.shard.world == 1 else shard_path(self.stage_path, self.shard)

        def repair() -> None:  # a killed run's torn tails, repaired once, by one rank (each rank repairs its own)
            for file in [self.stage_path, *shard_files(self.stage_path)]:
                if file != own:
                    read_jsonl(file, repair_tail=True)

        def load() -> None:
            JsonlSink.__init__(self, own, key)
            self._load_others()

        self.shard.together(repair if self.shard.rank == 0 else lambda: None)  # no rank reads a file under repair
        self.shard.together(load)  # no rank appends to a shard that another rank is still reading

    def _load_others(self) -> None:
        for file in [self.stage_path, *shard_files(self.stage_path)]:
            if file == self.path:
                continue
            for record in read_jsonl(file):
                if self.key not in record:
                    raise PrismError(f"{file}: record without key {self.key!r}")
                self._records.setdefault(record[self.key], record)

    def sync(self, order: Sequence[str] = ()) -> None:
        """Once every rank has appended its batches: rank 0 merges the shards into the stage file, all read it."""
        merged = self.shard.together(lambda: merge_shards(self.stage_path, order, self.key)
                                     if self.shard.rank == 0 else False)  # the shards gone before anyone appends
        if self.shard.world == 1 and not merged:
            return  # alone and nothing merged: the records in memory are the file's

        def reload() -> int:
            self._records = {}
            for record in read_jsonl(self.stage_path):
                self._records.setdefault(record[self.key], record)
            return len(self._records)

        counts = self.shard.gather(self.shard.together(reload))
        if len(set(counts)) > 1:
            raise PrismError(f"{self.stage_path}: the ranks read different stage files ({counts} records by rank); "
                             f"data.corpus_dir must be on a filesystem that every node shares")


def plan_batches(items: Sequence[dict], batch_size: int) -> list[list[dict]]:
    """Every item, sorted by prompt length (little padding), in batches: the same plan for any number of ranks."""
    ordered = sorted(items, key=lambda i: len(i["prompt_ids"]))
    return [ordered[start:start + batch_size] for start in range(0, len(ordered), batch_size)]


def todo_batches(items: Sequence[dict], batch_size: int, sink: JsonlSink) -> list[list[dict]]:
    """The plan's batches that run here (batch j on rank j mod world) and still hold an unfinished item.

    A batch is rerun whole, with its own seed, even when a torn write left part of it finished: only its
    missing records are appended, and they are those the uninterrupted batch would have written.
    """
    shard = sink.shard if isinstance(sink, ShardedSink) else Shard()
    return [batch for j, batch in enumerate(plan_batches(items, batch_size))
            if shard.owns(j) and any(item["id"] not in sink for item in batch)]


def run_stage(work: Callable[[], None], items: Sequence[dict], batch_size: int, sink: JsonlSink) -> None:
    """Run this rank's ``work`` on a stage, then make every rank's records visible to every rank.

    Every rank calls this, also one with nothing to do: it is a collective. A failure on any rank stops all.
    """
    if not isinstance(sink, ShardedSink):
        work()
        return
    sink.shard.together(work)  # also: every rank has appended its last batch before rank 0 merges
    sink.sync([item["id"] for batch in plan_batches(items, batch_size) for item in batch])


@contextmanager
def stage_progress(total: int, description: str, sink: JsonlSink) -> Iterator[Callable[[int], None]]:
    """Progress of this rank's share, reported by rank 0 only (one bar or log, not one per rank)."""
    shard = sink.shard if isinstance(sink, ShardedSink) else Shard()
    if shard.rank != 0:
        yield lambda n: None
        return
    label = description if shard.world == 1 else f"{description} [rank 0 of {shard.world}]"
    with progress(total, label) as advance:
        yield advance
