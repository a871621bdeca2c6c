"""What the training code needs to know about the other ranks: gathering objects, ZeRO-3 partitioned weights."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch


def world_size() -> int:
    """Processes in the default group (1 outside a distributed run)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather_objects(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (a collective: every rank must call it)."""
    if world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def zero3_partitioned(module: torch.nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 holds this module's weights in shards (then every forward is a collective)."""
    first = next(module.parameters(), None)  # DeepSpeed converts all of a module's parameters or none
    return first is not None and hasattr(first, "ds_id")


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """The values this rank holds: the ZeRO-3 shard of a partitioned parameter, else the parameter itself.

    A shard is padded to equal length on every rank and DeepSpeed leaves the padding uninitialised: cut it off.
    """
    shard = getattr(param, "ds_tensor", None)
    if shard is None:
        return param
    start = shard.numel() * torch.distributed.get_rank(group=param.ds_process_group)
    return shard.narrow(0, 0, max(0, min(param.ds_numel - start, shard.numel())))


@contextmanager
def gathered(params: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """Full values of ZeRO-3 partitioned ``params`` inside the block (a collective); a no-op for ordinary ones."""
    params = list(params)
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    import deepspeed  # lazy: optional (deepspeed extra), only under ZeRO-3

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield
