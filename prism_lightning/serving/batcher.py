"""The micro-batcher: requests that arrive within a short window are gated together and generated in one
mixed-route ``generate`` call per set of sampling parameters, on one worker thread (the model is not shared)."""

from __future__ import annotations

import asyncio
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

from transformers import StoppingCriteriaList

from prism_lightning.inference.gated_model import GatedModel
from prism_lightning.model.generation import DecodingConfig, stop_token_ids
from prism_lightning.serving.row_stops import RowState, RowStops


@dataclass
class Job:
    """One request's prompt, route and decoding; ``on_text`` (streaming) is called from the worker thread."""

    prompt_ids: list[int]
    route: str
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    on_start: Optional[Callable[[dict], None]] = None
    on_text: Optional[Callable[[str], None]] = None
    future: Optional[asyncio.Future] = field(default=None, repr=False)
    cancelled: bool = False  # set by the server when a streaming client disconnects

    def cancel(self) -> None:
        """Stop generating for this job at the next step (its row is padded from then on)."""
        self.cancelled = True

    def sampling_key(self) -> tuple:
        """Rows that can share one ``generate`` call: all greedy rows; sampled rows with the same parameters."""
        return ("greedy",) if self.temperature <= 0 else ("sample", self.temperature, self.top_p, self.seed)


@dataclass
class Completion:
    """What a job produced: text, token counts, why it ended, and its route as ``GatedModel`` reports it."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    route: dict


@dataclass
class BatchStats:
    """Running counts, for ``/health`` and the load bench: batches run, rows in them, the largest batch, rows
    stopped early because their client left."""

    batches: int = 0
    rows: int = 0
    largest: int = 0
    cancelled: int = 0


class MicroBatcher:
    """Collects jobs for up to ``max_wait_ms`` after the first (or until ``max_batch`` are waiting), runs them as
    one batch on a single worker thread, and resolves each job's future. Jobs that arrive while a batch runs wait
    for the next one."""

    def __init__(self, model: GatedModel, max_batch: int = 16, max_wait_ms: float = 10.0) -> None:
        self.model = model
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.stats = BatchStats()
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prism-generate")
        self._task: Optional[asyncio.Task] = None

    def start(self) -> None:
        """Start the collecting loop on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop collecting (after the server has finished its in-flight requests) and release the worker."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._worker.shutdown(wait=True)

    async def submit(self, job: Job) -> Completion:
        """Queue a job and wait for its completion."""
        job.future = asyncio.get_running_loop().create_future()
        await self._queue.put(job)
        return await job.future

    async def _collect(self) -> list[Job]:
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    async def _loop(self) -> None:
        while True:
            batch = [j for j in await self._collect() if not j.future.done()]  # a client that left is not run
            if not batch:
                continue
            try:
                await self._dispatch(batch)
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the error, the server goes on
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)

    async def _dispatch(self, batch: list[Job]) -> None:
        """Run one collected batch on the worker thread and resolve its jobs' futures."""
        results = await asyncio.get_running_loop().run_in_executor(self._worker, self.run_batch, batch)
        for job, result in zip(batch, results):
            if not job.future.done():
                job.future.set_result(result)

    def run_batch(self, batch: list[Job]) -> list[Completion]:
        """Route every job in one gate pass, then one ``generate`` call per sampling key (worker thread)."""
        model = self.model
        prompts = [j.prompt_ids for j in batch]
        names, probs = model.mixed_routes(prompts, [j.route for j in batch], batch_size=self.max_batch)
        routes = [model.route_fields(n, p) for n, p in zip(names, probs.tolist())]
        for job, route in zip(batch, routes):
            if job.on_start is not None:
                job.on_start(route)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(batch):
            groups.setdefault(job.sampling_key(), []).append(i)
        rows: list[Optional[RowState]] = [None] * len(batch)
        eos = stop_token_ids(model.backbone)
        for key, index in groups.items():
            first = batch[index[0]]
            # A sampled group without a seed still gets one: the batch's draws are then reproducible from the log.
            seed = first.seed if first.seed is not None else (0 if key[0] == "greedy" else secrets.randbelow(2**31))
            decoding = DecodingConfig(max_new_tokens=max(batch[i].max_tokens for i in index),
                                      temperature=first.temperature, top_p=first.top_p, seed=seed,
                                      batch_size=len(index))
            states = [RowState(batch[i].max_tokens, batch[i].stop, batch[i].on_text,
                               (lambda job=batch[i]: job.cancelled)) for i in index]
            criteria = RowStops(model.backbone.tokenizer, max(len(prompts[i]) for i in index), states, eos)
            model.generate_rows([prompts[i] for i in index], [names[i] for i in index], decoding, seed=seed,
                                stopping_criteria=StoppingCriteriaList([criteria]))
            criteria.finish()
            for i, state in zip(index, states):
                rows[i] = state
        self.stats.batches += 1
        self.stats.rows += len(batch)
        self.stats.largest = max(self.stats.largest, len(batch))
        self.stats.cancelled += sum(r.finish_reason == "cancelled" for r in rows)
        return [Completion(text=r.text, prompt_tokens=len(p), completion_tokens=r.generated,
                           finish_reason=r.finish_reason or "length", route=route)
                for r, p, route in zip(rows, prompts, routes)]

