"""The teacher's pass of a distillation step: the frozen base (adapter disabled, eval mode, no grad) given the
persona, with each persona block's keys/values reused, read out as top-k targets at the response tokens."""

from __future__ import annotations

from typing import Optional

import torch

from prism_lightning.distributed.collectives import world_size, zero3_partitioned
from prism_lightning.model.prefix_states import hidden_after_prefixes
from prism_lightning.training.losses import rows_at, teacher_topk


class TeacherPass:
    """Mixin of ``DistillationStudent``: reads ``self.model``, ``self.hparams`` (``prefix_reuse``, ``top_k``,
    ``temperature``, ``head_chunk``) and ``self.prefix_states``."""

    def teacher_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       prefix: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's hidden states and, per row, how many leading tokens they leave out (reused prefixes)."""
        if (prefix is not None and self.hparams.prefix_reuse and bool(prefix.any())
                and not zero3_partitioned(self.model)):
            found = hidden_after_prefixes(self.model, input_ids, attention_mask, prefix, self.prefix_states)
            if found is not None:
                return found
        return self.decoder_hidden(input_ids, attention_mask), torch.zeros_like(input_ids[:, 0])

    @torch.no_grad()
    def teacher_targets(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
                        mask: torch.Tensor, chunks: int = 1,
                        prefix: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The frozen base's targets (adapter disabled, dropout off) at the masked positions of ``input_ids``.

        With ``top_k`` the teacher's k largest logits / T in fp32 and their indices ([N, k] each), the head applied
        in ``chunks`` chunks of ``head_chunk`` tokens (some empty when a rank has fewer tokens than another); with
        ``top_k`` 0 its full logits [N, V] and None. In one process only the rows with a masked token run a
        forward; with several ranks every row does (under ZeRO-3 every rank must run the same forwards). ``prefix``
        ([B], optional): each row's shared persona-block length, whose keys/values are reused (``prefix_reuse``).
        """
        hp = self.hparams
        rows = mask.any(1) if world_size() == 1 else torch.ones_like(mask[:, 0])
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter():
                hidden, skipped = self.teacher_hidden(input_ids[rows], attention_mask[rows],
                                                      None if prefix is None else prefix[rows])
                selected = rows_at(hidden, (positions[rows] - skipped[:, None]).clamp(min=0), mask[rows])
                if not hp.top_k:
                    return self.head_logits(selected), None
                step = hp.head_chunk
                parts = [teacher_topk(self.head_logits(selected[c * step:(c + 1) * step]), hp.temperature, hp.top_k)
                         for c in range(chunks)]
        finally:
            self.model.train(was_training)
        return torch.cat([v for v, _ in parts]), torch.cat([i for _, i in parts])
