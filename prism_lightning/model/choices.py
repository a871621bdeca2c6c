"""Read a closed set of choices (A / B / TIE, grades 1–10, Yes / No, letters A–D) from a causal LM.

A choice is scored by the probability of its WHOLE token sequence after the prompt, so it works whatever the
tokenizer does with it: Llama-3 writes "10" as one token, SentencePiece (Mistral) writes "1" as "▁", "1", and
SmolLM2 writes "TIE" as "TI", "E". The choices' proper prefixes form a trie; one forward of prompt + a maximal
prefix reads every prefix on it, so single-token choices cost exactly one forward per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from prism_lightning.utils.errors import PrismError

# (prompts, vocabulary columns, tail) -> log-probs of those columns after each prompt's last ``tail`` positions,
# [n, tail, k]; ``generation.token_logprobs`` (with model, pad id and device bound) is one.
LogprobFn = Callable[[Sequence[Sequence[int]], Sequence[int], int], torch.Tensor]
Sequences = tuple[tuple[int, ...], ...]

# A choice whose probability as a complete answer clamps to 0 gets this log-prob: finite, so stored verdicts
# stay standard JSON (no -Infinity), and exp() of it is 0 for every sum it enters.
FLOOR = -1.0e4


@dataclass(frozen=True)
class ChoiceLogprobs:
    """Per prompt: log P(choice is the complete answer) [n, k] (fp32, CPU) and the probability on all choices [n]."""

    logprobs: torch.Tensor
    mass: torch.Tensor


def tokenizer_name(tokenizer: Any) -> str:
    """A tokenizer's name for error messages (its hub id or path, else its class)."""
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def encode_choices(tokenizer: Any, choices: Sequence[str]) -> Sequences:
    """Token ids of each choice as the assistant's answer; raises ValueError when two cannot be told apart."""
    # Encoded exactly as ChatFormatter.response_ids encodes every training response (the text alone, no special
    # tokens): that is the token sequence the model was taught to emit after the generation prompt, e.g. the
    # leading "▁" SentencePiece puts before a fresh response. Reading any other sequence would score an answer
    # the model is never trained to write.
    sequences = tuple(tuple(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in choices)
    name = tokenizer_name(tokenizer)
    for text, ids in zip(choices, sequences):
        if not ids:
            raise ValueError(f"choice {text!r} encodes to no tokens with tokenizer {name}")
    for i, ids in enumerate(sequences):
        same = [choices[j] for j in range(i + 1, len(choices)) if sequences[j] == ids]
        if same:
            raise ValueError(f"choices {choices[i]!r} and {same[0]!r} encode to the same tokens {list(ids)} with "
                             f"tokenizer {name}; their probabilities cannot be told apart")
    return sequences


def _extends(longer: Sequence[int], shorter: Sequence[int]) -> bool:
    return len(longer) > len(shorter) and tuple(longer[:len(shorter)]) == tuple(shorter)


def forward_paths(sequences: Sequences) -> Sequences:
    """The maximal proper prefixes of the choices: one forward of prompt + path reads every prefix on the path."""
    prefixes = {ids[:t] for ids in sequences for t in range(len(ids))}
    return tuple(sorted(p for p in prefixes if not any(_extends(q, p) for q in prefixes)))


def nearest_extensions(sequences: Sequences) -> tuple[tuple[int, ...], ...]:
    """Per choice, the choices that extend it with no other choice in between (e.g. "1" → "10" when multi-token)."""
    out = []
    for i, short in enumerate(sequences):
        longer = [j for j, ids in enumerate(sequences) if _extends(ids, short)]
        out.append(tuple(j for j in longer if not any(_extends(sequences[j], sequences[m]) for m in longer)))
    return tuple(out)


def complete_answer_logprobs(sequence_logprobs: torch.Tensor, extensions: Sequence[Sequence[int]]) -> ChoiceLogprobs:
    """log P(choice is the whole answer) from log P(its token sequence) [n, k]; the one home of prefix handling.

    When a choice's tokens start another choice ("1" and "10" written "1", "0"), P("1") includes every "10"; the
    grade 1 is what remains after the choices that extend it are taken out (clamped at 0). Nearest extensions
    only: "10" already holds any "100", so subtracting both would count it twice.
    """
    logprobs = sequence_logprobs.float().cpu().clone()  # choices nothing extends keep their log-prob bit for bit
    seq = logprobs.exp()
    for i, longer in enumerate(extensions):
        if longer:
            rest = (seq[:, i] - seq[:, list(longer)].sum(-1)).clamp_min(0)
            logprobs[:, i] = torch.where(rest > 0, rest.log(), torch.full_like(rest, FLOOR))
    return ChoiceLogprobs(logprobs, logprobs.exp().sum(-1))


class ChoiceReader:
    """A closed set of choices encoded once for one tokenizer; ``read`` scores it after any prompts."""

    def __init__(self, tokenizer: Any, choices: Sequence[str]) -> None:
        self.choices = tuple(choices)
        self.sequences = encode_choices(tokenizer, self.choices)
        self.paths = forward_paths(self.sequences)
        self.extensions = nearest_extensions(self.sequences)
        self.columns = tuple(sorted({t for ids in self.sequences for t in ids}))
        # Which forward (path), tail position and column give each step of each choice: step t of a choice is read
        # after its prefix ids[:t], i.e. at position t of the first path that starts with that prefix.
        self._steps: list[tuple[int, int, int, int]] = []  # (path, choice, position, column)
        for i, ids in enumerate(self.sequences):
            for t in range(len(ids)):
                path = next(k for k, p in enumerate(self.paths) if p[:t] == ids[:t])
                self._steps.append((path, i, t, self.columns.index(ids[t])))

    @property
    def forwards_per_prompt(self) -> int:
        """How many forward passes one prompt costs (1 when every choice is a single token)."""
        return len(self.paths)

    def sequence_logprobs(self, logprobs: LogprobFn, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """log P(each choice's full token sequence | prompt), [n, k], one ``logprobs`` call per path."""
        out = torch.zeros(len(prompts), len(self.choices))
        if not prompts:
            return out
        for k, path in enumerate(self.paths):
            tail = len(path) + 1  # the position after the prompt, then after each path token
            lp = logprobs([list(p) + list(path) for p in prompts], self.columns, tail).float().cpu()
            for path_index, choice, position, column in self._steps:
                if path_index == k:
                    out[:, choice] += lp[:, position, column]
        return out

    def read(self, logprobs: LogprobFn, prompts: Sequence[Sequence[int]]) -> ChoiceLogprobs:
        """log P(each choice is the complete answer | prompt) [n, k] and the probability mass on the choices."""
        return complete_answer_logprobs(self.sequence_logprobs(logprobs, prompts), self.extensions)


def opens_reasoning(prompt_text: str) -> bool:
    """True when a rendered generation prompt ends inside an open ``<think>`` block (DeepSeek-R1 style)."""
    return prompt_text.rfind("<think>") > prompt_text.rfind("</think>")


def require_direct_answer(formatter: Any, who: str, fix: str) -> None:
    """Raise PrismError when the chat template makes the next token reasoning, not an answer."""
    probe = formatter.prompt_text("Reply with A or B.")
    if opens_reasoning(probe):
        raise PrismError(f"{who}: the chat template of {tokenizer_name(formatter.tokenizer)} opens a <think> "
                         f"reasoning block after the generation prompt, so verdicts cannot be read from "
                         f"next-token probabilities; {fix}")
