"""Distillation loss math as pure functions."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 2.0,
                  top_k: Optional[int] = 64) -> torch.Tensor:
    """Per-token KL(teacher ‖ student) × T², on the teacher's top-k support (``top_k`` None or 0: full vocabulary).

    Both distributions are renormalised over the same support, so KL(p ‖ p) is exactly 0.
    Inputs are [N, V]; the result is [N].
    """
    teacher = teacher_logits.float() / temperature
    student = student_logits.float() / temperature
    if top_k:
        teacher, index = teacher.topk(min(top_k, teacher.shape[-1]), dim=-1)
        student = student.gather(-1, index)
    log_p = F.log_softmax(teacher, dim=-1)
    log_q = F.log_softmax(student, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1) * temperature ** 2


def response_logits(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Logits that predict each response token: ``logits[b, positions[b, t]]`` -> [B, R, V]."""
    index = positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    return logits.gather(1, index)
