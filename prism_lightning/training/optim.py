"""The optimizer and its schedule: AdamW (DeepSpeed's CPU AdamW under ZeRO-Offload), linear warmup then decay."""

from __future__ import annotations

import math
from typing import Any

import torch

from prism_lightning.distributed.strategies import offloads_optimizer


def lr_lambda(total_steps: int, warmup_ratio: float):
    """Linear warmup then linear decay to 0."""
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    return factor


def adamw(params: Any, lr: float, weight_decay: float, trainer: Any = None) -> torch.optim.Optimizer:
    """AdamW; DeepSpeed's CPU AdamW (same update) when the strategy keeps the optimizer in CPU memory.

    ZeRO-Offload refuses a client optimizer that is not DeepSpeed's: ``deepspeed_stage_3_offload`` needs this one.
    """
    if trainer is not None and offloads_optimizer(trainer.strategy):
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # lazy: optional (deepspeed extra)

        return DeepSpeedCPUAdam(params, lr=lr, weight_decay=weight_decay, adamw_mode=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def with_schedule(optimizer: torch.optim.Optimizer, total_steps: float, warmup_ratio: float) -> dict:
    """Attach the warmup/decay schedule, stepped every optimizer step."""
    total = int(total_steps) if math.isfinite(total_steps) else 1000
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, warmup_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
