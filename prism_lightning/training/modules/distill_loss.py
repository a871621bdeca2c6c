"""The distillation loss wiring of a step: which rows and tokens each KL term reads, the teacher's targets (online
or cached) against the student's chunked LM head, and the optional retain term. The math is in ``losses.py``."""

from __future__ import annotations

import math
from typing import Optional

import torch

from prism_lightning.distributed.collectives import all_gather_objects, world_size, zero3_partitioned
from prism_lightning.training.losses import chunked_topk_kl, kl_divergence, rows_at
from prism_lightning.utils.errors import PrismError


class DistillLoss:
    """Mixin of ``DistillationStudent``: reads ``self.hparams`` and calls ``self.teacher_targets`` and
    ``self.head_logits``."""

    def loss_chunks(self, tokens: int) -> int:
        """LM-head chunks for ``tokens`` loss tokens; under ZeRO-3 the largest count of any rank.

        Each forward of a ZeRO-3 partitioned module is a collective, so every rank must run the head equally often
        (in forward and in the checkpointed recompute): a rank with fewer tokens runs some chunks empty.
        """
        chunks = max(1, math.ceil(tokens / self.hparams.head_chunk))
        return max(all_gather_objects(chunks)) if zero3_partitioned(self.model) else chunks

    def kl_term(self, student_hidden: torch.Tensor, batch: dict, mask: torch.Tensor, teacher_ids: torch.Tensor,
                teacher_mask: torch.Tensor, teacher_pos: torch.Tensor, cached: bool = False,
                teacher_prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean per-token KL(teacher ‖ student) over the masked response tokens; 0 (on the graph) when none are.

        ``cached``: the batch carries the teacher's top-k (``data.teacher: cached``), so no teacher forward runs.
        With several ranks a rank without loss tokens still runs every forward the others run, on nothing.
        """
        hp = self.hparams
        tokens = int(mask.sum())
        if not tokens and world_size() == 1:
            return student_hidden.sum() * 0.0
        chunks = self.loss_chunks(tokens)
        if cached:
            teacher, index = batch["teacher_values"][mask].float() / hp.temperature, batch["teacher_index"][mask]
            if tokens and index.shape[-1] != hp.top_k:
                raise PrismError(f"the cached teacher holds top-{index.shape[-1]} targets but model.top_k is "
                                 f"{hp.top_k}; build the cache with the same k (the CLI links them)")
        else:
            teacher, index = self.teacher_targets(teacher_ids, teacher_mask, teacher_pos, mask, chunks, teacher_prefix)
        student = rows_at(student_hidden, batch["student_pos"], mask)
        if index is None:
            per_token = kl_divergence(teacher, self.head_logits(student), hp.temperature, None)
        else:
            per_token = chunked_topk_kl(self.head_logits, student, teacher, index, hp.temperature, hp.head_chunk,
                                        chunks)
        return per_token.mean() if tokens else (per_token.sum() + student_hidden.sum()) * 0.0

    def distill_loss(self, batch: dict, student_hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """KL on distill rows (teacher with persona) and, if weighted, on retain rows (teacher = base, no persona).

        With several ranks every rank runs the same forwards and reports the same keys whatever its batch holds:
        under ZeRO-3 each forward is a collective, and synced logs need the same keys on every rank.
        """
        hp = self.hparams
        distill_rows = batch["label"] > 0.5
        mask = batch["response_mask"] & distill_rows[:, None]
        out = {"kl": self.kl_term(student_hidden, batch, mask, batch["teacher_ids"], batch["teacher_mask"],
                                  batch["teacher_pos"], cached="teacher_values" in batch,
                                  teacher_prefix=batch.get("teacher_prefix"))}
        loss = out["kl"]
        if hp.retain_weight > 0:
            mask = batch["response_mask"] & ~distill_rows[:, None]
            out["retain_kl"] = self.kl_term(student_hidden, batch, mask, batch["student_ids"], batch["student_mask"],
                                            batch["student_pos"])
            loss = loss + hp.retain_weight * out["retain_kl"]
        out["loss"] = loss
        return out


def loss_tokens(batch: dict) -> dict[str, int]:
    """Response tokens each KL term averages over in ``batch``: distill rows (``kl``), retain rows (``retain_kl``)."""
    distill = batch["label"] > 0.5
    return {"kl": int((batch["response_mask"] & distill[:, None]).sum()),
            "retain_kl": int((batch["response_mask"] & ~distill[:, None]).sum())}
