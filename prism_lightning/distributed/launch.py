"""Join the process group that a launcher (torchrun, srun) describes, for commands that run outside the Trainer."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from prism_lightning.utils.errors import PrismError

# Ranks wait at a stage's end for the slowest one; generous, so a long batch on a big model is not a timeout.
TIMEOUT = timedelta(hours=1)


@dataclass(frozen=True)
class Launch:
    """Where this process sits in a launched job."""

    rank: int
    world: int
    local_rank: int


def launched() -> Optional[Launch]:
    """This process's place from torchrun's variables (or srun's); None for a lone process.

    torchrun (and any launcher that follows it) sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. srun
    sets SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the address and port then come from Lightning's
    SLURMEnvironment (first node of the allocation, a port from the job id), written to MASTER_ADDR/MASTER_PORT.
    """
    env = os.environ
    if int(env.get("WORLD_SIZE", "1")) > 1:
        return Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
    from lightning.fabric.plugins.environments import SLURMEnvironment  # lazy: only outside torchrun-style launches

    if SLURMEnvironment.detect() and int(env.get("SLURM_NTASKS", "1")) > 1:
        slurm = SLURMEnvironment()
        _ = slurm.main_address, slurm.main_port  # both properties export MASTER_ADDR / MASTER_PORT
        return Launch(slurm.global_rank(), slurm.world_size(), slurm.local_rank())
    return None


@contextmanager
def process_group() -> Iterator[Optional[Launch]]:
    """Initialise torch.distributed for a launched job (gloo on CPU, nccl on GPU) and tear it down after.

    Nothing happens for a lone process or when a group already exists (inside a Trainer's strategy).
    """
    launch = launched()
    if launch is None or dist.is_initialized():
        yield launch
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    backend = "gloo"
    if torch.cuda.is_available():
        if launch.local_rank >= torch.cuda.device_count():
            raise PrismError(f"rank {launch.rank} has LOCAL_RANK {launch.local_rank}, but this node shows "
                             f"{torch.cuda.device_count()} GPU(s): start one process per GPU")
        torch.cuda.set_device(launch.local_rank)  # "cuda" (backbone.device auto) then means this rank's GPU
        backend = "nccl"
    dist.init_process_group(backend, init_method="env://", rank=launch.rank, world_size=launch.world,
                            timeout=TIMEOUT)
    try:
        yield launch
    finally:
        dist.destroy_process_group()
