"""``prism serve --engine vllm``: the project's gate routes each request (layer 0 of the base, micro-batched as on
the HF path), then vLLM generates it with the adapter its route names as a ``LoRARequest``, or none for the base.
vLLM schedules every request in flight together (continuous batching; base and adapter rows in one step)."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any, Optional

from prism_lightning.inference.export import adapter_dir
from prism_lightning.inference.gated_model import GatedModel
from prism_lightning.model.generation import stop_token_ids
from prism_lightning.model.row_routing import BASE
from prism_lightning.model.vllm_engine import engine_arguments
from prism_lightning.serving.batcher import Completion, Job, MicroBatcher
from prism_lightning.utils.errors import PrismError

# The ranks vLLM's LoRA config admits (vllm.config.lora.MaxLoRARanks in 0.32).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank(directory: Path, adapters: list[str]) -> int:
    """The smallest rank vLLM admits that holds every adapter of the export."""
    largest = max(json.loads((adapter_dir(directory, a) / "adapter_config.json").read_text())["r"] for a in adapters)
    fits = [r for r in LORA_RANKS if r >= largest]
    if not fits:
        raise PrismError(f"{directory}: adapter rank {largest} is above vLLM's largest LoRA rank {LORA_RANKS[-1]}")
    return fits[0]


class VllmBatcher(MicroBatcher):
    """``MicroBatcher``'s interface (``submit``, ``stats``, ``start``, ``stop``): the gate runs on collected
    requests in the worker thread, then every request generates in vLLM's async engine as soon as it is routed.

    ``stats`` counts gate batches (``batches``, ``largest``), requests (``rows``) and aborted requests
    (``cancelled``).
    """

    def __init__(self, model: GatedModel, export: Path, max_batch: int = 16, max_wait_ms: float = 10.0,
                 kv_cache_gib: float = 2.0) -> None:
        super().__init__(model, max_batch, max_wait_ms)
        from vllm.lora.request import LoRARequest

        export = Path(export)
        # One slot more than there are adapters: vLLM 0.32's CPU LoRA ops read a base row's slot index -1 as the
        # LAST slot, so with every slot holding an adapter the base rows of a mixed batch ran that adapter
        # (tests/test_serve.py's mixed batch caught it). Slots fill first-free, so the last one stays empty (zero).
        self.arguments = engine_arguments(model.backbone, model.backbone.config, kv_cache_gib, enable_lora=True,
                                          max_loras=len(model.adapters) + 1,
                                          max_lora_rank=lora_rank(export, model.adapters))
        self.lora = {BASE: None, **{name: LoRARequest(name, k + 1, str(adapter_dir(export, name)))
                                    for k, name in enumerate(model.adapters)}}
        self.eos = list(stop_token_ids(model.backbone))
        self.engine: Any = None
        self._running: set[asyncio.Task] = set()

    def start(self) -> None:
        """Start vLLM's async engine (its own processes), then the collecting loop."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.arguments))
        super().start()

    async def stop(self) -> None:
        """Stop collecting, wait for the requests vLLM is generating, then stop the engine."""
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        await super().stop()
        if self.engine is not None:
            self.engine.shutdown()

    async def _dispatch(self, batch: list[Job]) -> None:
        """Route a collected batch on the worker thread, then start each job's generation in vLLM."""
        loop = asyncio.get_running_loop()
        routes = await loop.run_in_executor(self._worker, self.route_batch, batch)
        for job, (name, route) in zip(batch, routes):
            task = loop.create_task(self._generate(job, name, route))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def route_batch(self, batch: list[Job]) -> list[tuple[str, dict]]:
        """The gate on every job of a collected batch (worker thread): adapter name and reported route per job."""
        names, probs = self.model.mixed_routes([j.prompt_ids for j in batch], [j.route for j in batch],
                                               batch_size=self.max_batch)
        self.stats.batches += 1
        self.stats.rows += len(batch)
        self.stats.largest = max(self.stats.largest, len(batch))
        return [(n, self.model.route_fields(n, p)) for n, p in zip(names, probs.tolist())]

    async def _generate(self, job: Job, name: str, route: dict) -> None:
        """One request on vLLM with its route's adapter, streamed to ``job.on_text``; resolves ``job.future``."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        if job.on_start is not None:
            job.on_start(route)
        params = SamplingParams(max_tokens=job.max_tokens, temperature=job.temperature,
                                top_p=job.top_p if job.temperature > 0 else 1.0, seed=job.seed,
                                stop=list(job.stop) or None, stop_token_ids=self.eos, skip_special_tokens=True,
                                output_kind=RequestOutputKind.DELTA)
        request_id = uuid.uuid4().hex
        text, tokens, reason = [], 0, None
        try:
            async for out in self.engine.generate(TokensPrompt(prompt_token_ids=list(job.prompt_ids)), params,
                                                  request_id, lora_request=self.lora[name]):
                piece = out.outputs[0]
                tokens += len(piece.token_ids)
                if piece.text:
                    text.append(piece.text)
                    if job.on_text is not None:
                        job.on_text(piece.text)
                reason = piece.finish_reason
                if job.cancelled and not out.finished:
                    await self.engine.abort(request_id)
                    reason = "cancelled"
                    break
        except Exception as exc:  # noqa: BLE001 - this request fails alone; the server goes on
            if not job.future.done():
                job.future.set_exception(exc)
            return
        if reason == "cancelled":
            self.stats.cancelled += 1
        if not job.future.done():
            job.future.set_result(Completion(text="".join(text), prompt_tokens=len(job.prompt_ids),
                                             completion_tokens=tokens, finish_reason=_finish(reason), route=route))


def _finish(reason: Optional[str]) -> str:
    """vLLM's finish reason as the HF path reports it (``abort`` is a client that left)."""
    return {"abort": "cancelled", None: "length"}.get(reason, reason)
