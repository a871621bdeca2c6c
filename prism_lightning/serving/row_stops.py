"""Per-row ends inside one batched ``generate``: each row's own token budget and stop strings, and its text as it
grows (for streaming), so requests with different limits share a batch and each stops where it would alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from transformers import StoppingCriteria

TextSink = Callable[[str], None]


@dataclass
class RowState:
    """One row's generated tokens, text and how it ended (``stop``: end of turn or a stop string; ``length``;
    ``cancelled``: its client left)."""

    limit: int
    stops: tuple[str, ...] = ()
    on_text: Optional[TextSink] = None
    cancelled: Callable[[], bool] = lambda: False  # the client went away: stop generating for it
    tokens: list[int] = field(default_factory=list)  # the text's tokens (an end-of-turn token is not text)
    generated: int = 0  # tokens the model produced for this row, an end-of-turn token included (usage counts it)
    text: str = ""
    sent: int = 0  # characters of ``text`` already handed to ``on_text``
    finish_reason: Optional[str] = None

    @property
    def done(self) -> bool:
        """Whether the row has ended."""
        return self.finish_reason is not None


class RowStops(StoppingCriteria):
    """Stopping criteria that end each row at its own budget, stop string or end-of-turn token.

    ``generate`` calls it after every step with the sequences so far; rows it reports done are padded from then on
    (the batch keeps running for the others). Stop strings are cut from the text, as OpenAI's API does; while
    streaming, the last characters that could begin a stop string are held back until they cannot.
    """

    def __init__(self, tokenizer: Any, prompt_width: int, rows: Sequence[RowState], eos_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.width = prompt_width
        self.rows = list(rows)
        self.eos = set(eos_ids)

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        """Record each live row's newest token; True for the rows that have ended."""
        newest = input_ids[:, -1].tolist() if input_ids.shape[1] > self.width else [None] * len(self.rows)
        for row, token in zip(self.rows, newest):
            if row.done or token is None:
                continue
            row.generated += 1
            if row.cancelled():
                row.finish_reason = "cancelled"
                continue
            if token in self.eos:
                row.finish_reason = "stop"
            else:
                row.tokens.append(token)
                row.text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
                cut = first_stop(row.text, row.stops)
                if cut is not None:
                    row.text, row.finish_reason = row.text[:cut], "stop"
                elif len(row.tokens) >= row.limit:
                    row.finish_reason = "length"
            self._send(row)
        return torch.tensor([r.done for r in self.rows], dtype=torch.bool, device=input_ids.device)

    def finish(self) -> None:
        """After ``generate`` returns: rows it ended itself (its own budget) are ``length``; flush held-back text."""
        for row in self.rows:
            if not row.done:
                row.finish_reason = "length"
            self._send(row)

    @staticmethod
    def _send(row: RowState) -> None:
        if row.on_text is None:
            return
        # Hold back an incomplete UTF-8 character (decoded as U+FFFD) and a tail that may still become a stop string.
        end = len(row.text) if row.done else safe_end(row.text, row.stops)
        if end > row.sent:
            row.on_text(row.text[row.sent:end])
            row.sent = end


def first_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    """Where the earliest stop string starts in ``text`` (None: none occurs)."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def safe_end(text: str, stops: Sequence[str]) -> int:
    """How much of a growing ``text`` can be sent now: not a trailing U+FFFD, not a suffix that begins a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    head = text[:end]
    held = max((k for stop in stops for k in range(min(len(stop) - 1, end), 0, -1) if head.endswith(stop[:k])),
               default=0)
    return end - held
