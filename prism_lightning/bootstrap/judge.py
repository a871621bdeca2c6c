"""Stage 3 scoring: the judge model's next-token log-probs on A / B / TIE (pairwise) or on grades 1–10."""

from __future__ import annotations

from typing import Sequence

import torch

from prism_lightning.backbone import Backbone
from prism_lightning.bootstrap.config import JudgeConfig
from prism_lightning.bootstrap.protocols import split_grade_logprobs
from prism_lightning.chat import ChatFormatter
from prism_lightning.generation import next_token_logprobs, token_logprobs
from prism_lightning.jsonl import JsonlSink
from prism_lightning.progress import progress

JUDGE_SYSTEM = ("You are a fair and rigorous judge of answers. Judge correctness first, then relevance, "
                "helpfulness and clarity. Length is not a merit: padding and repetition count against an answer.")
PAIRWISE = ("Question:\n{question}\n\n[Answer A]\n{a}\n[End of Answer A]\n\n[Answer B]\n{b}\n[End of Answer B]\n\n"
            "Which answer is better? Reply with a single token: A, B, or TIE.")
POINTWISE = ("Question:\n{question}\n\n[Answer]\n{answer}\n[End of Answer]\n\n"
             "Rate the answer from 1 (useless) to 10 (excellent). Reply with the number only.")


def single_token(tokenizer, text: str) -> int:
    """The first token id of ``text``; choice tokens must start with distinct tokens."""
    return tokenizer(text, add_special_tokens=False)["input_ids"][0]


class Judge:
    """Reads verdicts from next-token log-probabilities: greedy by construction, nothing parsed from free text."""

    def __init__(self, backbone: Backbone, config: JudgeConfig) -> None:
        self.backbone = backbone
        self.config = config
        self.formatter = ChatFormatter(backbone.tokenizer)
        tok = backbone.tokenizer
        self.choice_ids = [single_token(tok, s) for s in ("A", "B", "TIE")]
        self.digit_ids = [single_token(tok, str(d)) for d in range(1, 10)]
        self.zero_id = single_token(tok, "0")
        if len(set(self.choice_ids)) != 3 or len(set(self.digit_ids)) != 9:
            raise ValueError("judge tokenizer does not give distinct first tokens for A/B/TIE and digits 1-9")

    def truncate(self, text: str) -> str:
        """Cut an answer to ``max_answer_tokens`` tokens (tokens, not characters)."""
        ids = self.backbone.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.config.max_answer_tokens:
            return text
        return self.backbone.tokenizer.decode(ids[:self.config.max_answer_tokens]) + " …"

    @torch.no_grad()
    def next_token_logprobs(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Log-softmax over the vocabulary at the last prompt position, for a batch of token id lists."""
        return next_token_logprobs(self.backbone.model, self.backbone.tokenizer.pad_token_id, self.backbone.device,
                                   prompts)

    def _prompt_ids(self, user: str) -> list[int]:
        return self.formatter.prompt_ids(user, JUDGE_SYSTEM)

    def _run(self, items: list[dict], sink: JsonlSink, description: str, score) -> None:
        pending = sorted((i for i in items if i["id"] not in sink), key=lambda i: len(i["prompt_ids"]))
        if not pending:
            return
        with progress(len(pending), description) as advance:
            for start in range(0, len(pending), self.config.batch_size):
                batch = pending[start:start + self.config.batch_size]
                sink.append(score(batch))
                advance(len(batch))

    def score_pairs(self, pairs: list[dict], sink: JsonlSink, description: str) -> None:
        """Judge each ``{"id", "question", "candidate", "baseline"}`` in both orders; store A/B/TIE log-probs."""
        items = []
        for pair in pairs:
            q, cand, base = pair["question"], self.truncate(pair["candidate"]), self.truncate(pair["baseline"])
            items.append({"id": pair["id"], "prompt_ids": self._prompt_ids(PAIRWISE.format(question=q, a=base, b=cand)),
                          "swap_ids": self._prompt_ids(PAIRWISE.format(question=q, a=cand, b=base))})

        def score(batch: list[dict]) -> list[dict]:
            lp = self.next_token_logprobs([i["prompt_ids"] for i in batch] + [i["swap_ids"] for i in batch])
            lp = lp[:, self.choice_ids]
            n = len(batch)
            return [{"id": item["id"], "first": lp[k].tolist(), "second": lp[n + k].tolist()}
                    for k, item in enumerate(batch)]

        self._run(items, sink, description, score)

    def score_points(self, answers: list[dict], sink: JsonlSink, description: str) -> None:
        """Grade each ``{"id", "question", "answer"}`` 1–10; store log-probs of "1".."9" and of "10"."""
        items = [{"id": a["id"], "prompt_ids": self._prompt_ids(
            POINTWISE.format(question=a["question"], answer=self.truncate(a["answer"])))} for a in answers]
        one = self.digit_ids[0]

        def score(batch: list[dict]) -> list[dict]:
            tail = token_logprobs(self.backbone.model, self.backbone.tokenizer.pad_token_id, self.backbone.device,
                                  [i["prompt_ids"] + [one] for i in batch], self.digit_ids + [self.zero_id], 2)
            digits, ten = split_grade_logprobs(tail)
            return [{"id": item["id"], "digits": digits[k].tolist(), "ten": float(ten[k])}
                    for k, item in enumerate(batch)]

        self._run(items, sink, description, score)
