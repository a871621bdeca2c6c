"""Stage 3 scoring: the judge model's log-probs of the answers A / B / TIE (pairwise), of the grades 1–10
(pointwise), or of the answer itself given the query and without it (likelihood, pmi)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import torch

from prism_lightning.bootstrap.config import JudgeConfig
from prism_lightning.distributed.sharding import run_stage, stage_progress, todo_batches
from prism_lightning.model.backbone import Backbone
from prism_lightning.model.chat import ChatFormatter
from prism_lightning.model.choices import ChoiceReader, require_direct_answer
from prism_lightning.model.generation import append_grouped, continuation_logprob, token_logprobs
from prism_lightning.utils.jsonl import JsonlSink

if TYPE_CHECKING:
    from prism_lightning.model.vllm_engine import VllmEngine

JUDGE_SYSTEM = ("You are a fair and rigorous judge of answers. Judge correctness first, then relevance, "
                "helpfulness and clarity. Length is not a merit: padding and repetition count against an answer.")
PAIRWISE = ("Question:\n{question}\n\n[Answer A]\n{a}\n[End of Answer A]\n\n[Answer B]\n{b}\n[End of Answer B]\n\n"
            "Which answer is better? Reply with a single token: A, B, or TIE.")
POINTWISE = ("Question:\n{question}\n\n[Answer]\n{answer}\n[End of Answer]\n\n"
             "Rate the answer from 1 (useless) to 10 (excellent). Reply with the number only.")
# Column order of the stored pairwise records ``first`` / ``second`` (protocols.A, B, TIE).
PAIRWISE_CHOICES = ("A", "B", "TIE")
GRADES = tuple(str(g) for g in range(1, 11))  # column order of the stored pointwise records ``grades``
NOT_A_VERDICT = "set data.judge.model to a non-reasoning judge model"


def verdict_sequences(tokenizer, kind: str) -> list[list[int]]:
    """The token sequences a judge of ``kind`` (pairwise / pointwise) reads: what its stored records depend on.

    A likelihood judge reads no verdict: the answer's own tokens are what it scores.
    """
    if kind == "likelihood":
        return []
    reader = ChoiceReader(tokenizer, GRADES if kind == "pointwise" else PAIRWISE_CHOICES)
    return [list(ids) for ids in reader.sequences]


class Judge:
    """Reads verdicts from the log-probabilities of the choices' token sequences: nothing parsed from free text.

    With an ``engine`` (vLLM on the same weights) the log-probs come from it, several planned batches per call.
    """

    def __init__(self, backbone: Backbone, config: JudgeConfig, engine: Optional["VllmEngine"] = None) -> None:
        self.backbone = backbone
        self.config = config
        self.engine = engine
        self.formatter = ChatFormatter(backbone.tokenizer)
        require_direct_answer(self.formatter, "data.judge", NOT_A_VERDICT)
        self.pairwise = ChoiceReader(backbone.tokenizer, PAIRWISE_CHOICES)
        self.grades = ChoiceReader(backbone.tokenizer, GRADES)

    def truncate(self, text: str) -> str:
        """Cut an answer to ``max_answer_tokens`` tokens (tokens, not characters)."""
        ids = self.backbone.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.config.max_answer_tokens:
            return text
        return self.backbone.tokenizer.decode(ids[:self.config.max_answer_tokens]) + " …"

    def logprobs(self, prompts: Sequence[Sequence[int]], tokens: Sequence[int], tail: int) -> torch.Tensor:
        """Log-probs of ``tokens`` after the last ``tail`` positions of one batch ([n, tail, k]); a ``LogprobFn``."""
        if self.engine is not None:
            return self.engine.logprobs(prompts, tokens, tail)
        return token_logprobs(self.backbone.model, self.backbone.tokenizer.pad_token_id, self.backbone.device,
                              prompts, tokens, tail)

    def _prompt_ids(self, user: str) -> list[int]:
        return self.formatter.prompt_ids(user, JUDGE_SYSTEM)

    def _run(self, items: list[dict], sink: JsonlSink, description: str, score) -> None:
        # Batches planned over all items (this rank's share of them under a ShardedSink), as in generate_into:
        # the same batches, hence the same padding and log-probs, whatever the number of ranks or restarts.
        batches = todo_batches(items, self.config.batch_size, sink)

        def work() -> None:
            if not batches:
                return
            per_call = self.engine.batches_per_call if self.engine is not None else 1
            with stage_progress(sum(map(len, batches)), description, sink) as advance:
                append_grouped(batches, per_call, score, sink, advance)

        run_stage(work, items, self.config.batch_size, sink)

    def score_pairs(self, pairs: list[dict], sink: JsonlSink, description: str) -> None:
        """Judge each ``{"id", "question", "candidate", "baseline"}`` in both orders; store A/B/TIE log-probs."""
        items = []
        for pair in pairs:
            q, cand, base = pair["question"], self.truncate(pair["candidate"]), self.truncate(pair["baseline"])
            items.append({"id": pair["id"], "prompt_ids": self._prompt_ids(PAIRWISE.format(question=q, a=base, b=cand)),
                          "swap_ids": self._prompt_ids(PAIRWISE.format(question=q, a=cand, b=base))})

        def score(batch: list[dict]) -> list[dict]:
            prompts = [i["prompt_ids"] for i in batch] + [i["swap_ids"] for i in batch]
            lp = self.pairwise.read(self.logprobs, prompts).logprobs
            n = len(batch)
            return [{"id": item["id"], "first": lp[k].tolist(), "second": lp[n + k].tolist()}
                    for k, item in enumerate(batch)]

        self._run(items, sink, description, score)

    def score_likelihood(self, answers: list[dict], sink: JsonlSink, description: str) -> None:
        """Score each ``{"id", "question", "answer"}`` by the answer's log-likelihood as the reply to the question
        (``cond``) and to an empty user turn (``uncond``), both without any persona, with its token count."""
        tokenizer = self.backbone.tokenizer
        empty = self.formatter.prompt_ids("")
        items = [{"id": a["id"], "prompt_ids": self.formatter.prompt_ids(a["question"]),
                  "answer_ids": tokenizer(self.truncate(a["answer"]), add_special_tokens=False)["input_ids"]}
                 for a in answers]

        def score(batch: list[dict]) -> list[dict]:
            prompts = [i["prompt_ids"] for i in batch] + [empty] * len(batch)
            continuations = [i["answer_ids"] for i in batch] * 2
            sums = (self.engine.continuation_logprob(prompts, continuations) if self.engine is not None else
                    continuation_logprob(self.backbone.model, tokenizer.pad_token_id, self.backbone.device, prompts,
                                         continuations))
            n = len(batch)
            return [{"id": item["id"], "cond": float(sums[k]), "uncond": float(sums[n + k]),
                     "tokens": len(item["answer_ids"])} for k, item in enumerate(batch)]

        self._run(items, sink, description, score)

    def score(self, kind: str, items: list[dict], sink: JsonlSink) -> None:
        """Score ``items`` (``labels.scoring_items``) with the scorer of ``kind``."""
        if kind == "pairwise":
            self.score_pairs(items, sink, "stage 3 judge (pairwise, both orders)")
        elif kind == "pointwise":
            self.score_points(items, sink, "stage 3 judge (pointwise)")
        else:
            self.score_likelihood(items, sink, "stage 3 judge (likelihood)")

    def score_points(self, answers: list[dict], sink: JsonlSink, description: str) -> None:
        """Grade each ``{"id", "question", "answer"}`` 1–10; store log P(grade g is the answer), g = 1..10."""
        items = [{"id": a["id"], "prompt_ids": self._prompt_ids(
            POINTWISE.format(question=a["question"], answer=self.truncate(a["answer"])))} for a in answers]

        def score(batch: list[dict]) -> list[dict]:
            grades = self.grades.read(self.logprobs, [i["prompt_ids"] for i in batch]).logprobs
            return [{"id": item["id"], "grades": grades[k].tolist()} for k, item in enumerate(batch)]

        self._run(items, sink, description, score)
