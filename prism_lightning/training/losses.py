"""Distillation loss math as pure functions.

``kl_divergence`` is the definition on full logit rows. Training never materialises those for a large vocabulary:
``teacher_topk`` keeps the teacher's k largest logits per token, and ``chunked_topk_kl`` applies the student's LM
head a chunk of tokens at a time (recomputed in backward), reading only the k logits the KL needs. Both give
``kl_divergence``'s values (tested).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 2.0,
                  top_k: Optional[int] = 64) -> torch.Tensor:
    """Per-token KL(teacher ‖ student) × T², on the teacher's top-k support (``top_k`` None or 0: full vocabulary).

    Both distributions are renormalised over the same support, so KL(p ‖ p) is exactly 0.
    Inputs are [N, V]; the result is [N].
    """
    if top_k:
        teacher, index = teacher_topk(teacher_logits, temperature, top_k)
        return kl_on_support(teacher, student_logits.gather(-1, index).float() / temperature, temperature)
    return kl_on_support(teacher_logits.float() / temperature, student_logits.float() / temperature, temperature)


def teacher_topk(teacher_logits: torch.Tensor, temperature: float, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logits of each row divided by T, in fp32, and their vocabulary indices: [N, k] each.

    The selection runs on the logits as they are (dividing by T > 0 keeps the order), so no fp32 copy of a
    vocabulary-wide row is ever made.
    """
    values, index = teacher_logits.topk(min(top_k, teacher_logits.shape[-1]), dim=-1)
    return values.float() / temperature, index


def kl_on_support(teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher) ‖ softmax(student)) × T² per row, both already divided by T and on the same support."""
    log_p = F.log_softmax(teacher, dim=-1)
    log_q = F.log_softmax(student, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1) * temperature ** 2


def chunked_topk_kl(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, teacher: torch.Tensor,
                    index: torch.Tensor, temperature: float, chunk: int,
                    chunks: Optional[int] = None) -> torch.Tensor:
    """Per-token top-k KL with the student's logits ``head(hidden)`` built ``chunk`` tokens at a time: [N].

    With more than one chunk each is checkpointed, so backward recomputes its logits instead of keeping
    N × V of them; at most ``chunk`` × V student logits exist at once. ``chunks`` (≥ what N needs) runs that many,
    the extra ones empty (ranks that must call the head equally often). ``teacher``/``index`` come from
    :func:`teacher_topk`.
    """
    chunks = chunks or max(1, -(-hidden.shape[0] // chunk))
    if chunks == 1:
        return _chunk_kl(head, hidden, teacher, index, temperature)
    parts = [checkpoint(_chunk_kl, head, hidden[c * chunk:(c + 1) * chunk], teacher[c * chunk:(c + 1) * chunk],
                        index[c * chunk:(c + 1) * chunk], temperature, use_reentrant=False)
             for c in range(chunks)]
    return torch.cat(parts)


def _chunk_kl(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, teacher: torch.Tensor,
              index: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL of one chunk: the student's logits at the teacher's top-k indices only go on in fp32."""
    student = head(hidden).gather(-1, index).float() / temperature
    return kl_on_support(teacher, student, temperature)


def rows_at(hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``hidden[b, positions[b, t]]`` for every (b, t) where ``mask`` holds, in row-major order: [N, H]."""
    b, t = mask.nonzero(as_tuple=True)
    return hidden[b, positions[b, t]]


def response_logits(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Logits that predict each response token: ``logits[b, positions[b, t]]`` -> [B, R, V]."""
    index = positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    return logits.gather(1, index)
