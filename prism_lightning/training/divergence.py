"""Divergence checks as pure functions: non-finite or exploding gradients, adapter weights and losses stop a run."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from prism_lightning.utils.errors import PrismError

ADVICE = "lower model.init_args.lr / gate_lr, or set trainer.gradient_clip_val"


def gradient_norm(parameters: Iterable[torch.nn.Parameter]) -> float:
    """Global L2 norm of the gradients present (fp32 accumulation)."""
    norms = [p.grad.detach().float().norm() for p in parameters if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def check_gradients(parameters: Iterable[torch.nn.Parameter], step: int, limit: float) -> float:
    """The gradient norm; raise naming the step when it is non-finite or above ``limit``."""
    return check_gradient_norm(gradient_norm(parameters), step, limit)


def check_gradient_norm(norm: float, step: int, limit: float) -> float:
    """``norm``; raise naming the step when it is non-finite or above ``limit``."""
    if not math.isfinite(norm) or norm > limit:
        raise PrismError(f"training diverged at global step {step}: gradient norm {norm:.3g} (limit "
                         f"model.init_args.divergence_limit={limit:g}); {ADVICE}")
    return norm


def check_weights(named: Iterable[tuple[str, torch.Tensor]], step: int, limit: float) -> None:
    """Raise naming the step and tensor when a trainable weight is non-finite or larger than ``limit`` in magnitude."""
    for name, tensor in named:
        peak = float(tensor.detach().abs().max()) if tensor.numel() else 0.0
        if not math.isfinite(peak) or peak > limit:
            raise PrismError(f"training diverged at global step {step}: weight {name} reached {peak:.3g} (limit "
                             f"model.init_args.divergence_limit={limit:g}); {ADVICE}")


def check_metric(name: str, value: float, where: str) -> None:
    """Raise when a validation metric is non-finite (a diverged or broken adapter)."""
    if not math.isfinite(value):
        raise PrismError(f"{where}: {name} is {value}; the adapter has diverged or the checkpoint is broken — "
                         f"retrain with a lower model.init_args.lr")
