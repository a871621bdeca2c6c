"""The FastAPI application: OpenAI's chat and text completion endpoints over the micro-batcher, ``/v1/models``,
``/health``, and errors in OpenAI's shape (the server keeps serving after any of them)."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from prism_lightning.inference.gated_model import GatedModel
from prism_lightning.serving.batcher import Completion, Job, MicroBatcher
from prism_lightning.serving.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    SamplingRequest,
    envelope,
    response_id,
    usage,
)
from prism_lightning.utils.errors import PrismError


@dataclass(frozen=True)
class ServeSettings:
    """What the application needs besides the model: its served name, batching, and default decoding."""

    model_name: str = "prism"
    max_batch_size: int = 16
    max_wait_ms: float = 10.0
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0


def served_models(name: str, adapters: list[str]) -> dict[str, str]:
    """Served model id -> route: the gated model, the base alone, the adapter always on, and each of K adapters."""
    models = {name: "gate", f"{name}:base": "base", f"{name}:adapter": "adapter"}
    if len(adapters) > 1:
        models.update({f"{name}:{a}": a for a in adapters})
    return models


def route_headers(route: dict) -> dict[str, str]:
    """The route as response headers (a streamed response's headers precede its body)."""
    probability = route.get("probability")
    headers = {"X-Prism-Route": route["route"],
               "X-Prism-Probability": "none" if probability is None else f"{probability:.4f}"}
    if route.get("adapter"):
        headers["X-Prism-Adapter"] = route["adapter"]
    return headers


def create_app(model: GatedModel, settings: ServeSettings = ServeSettings(),
               batcher: Optional[MicroBatcher] = None) -> FastAPI:
    """The server's application around a loaded ``GatedModel``; ``batcher`` (default: HF generation) runs the
    requests, e.g. a ``VllmBatcher``."""
    batcher = batcher or MicroBatcher(model, settings.max_batch_size, settings.max_wait_ms)
    models = served_models(settings.model_name, model.adapters)
    tokenizer = model.backbone.tokenizer

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="PRISM", lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        error = validation_error(exc)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), code=str(exc.status_code)).body(),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(_: Request, exc: Exception) -> JSONResponse:
        error = ApiError(500, f"{type(exc).__name__}: {exc}", kind="server_error")
        return JSONResponse(error.body(), status_code=500)

    @app.get("/health")
    async def health() -> dict:
        stats = batcher.stats
        return {"status": "ok", "model": settings.model_name, "adapters": model.adapters,
                "batches": stats.batches, "rows": stats.rows, "largest_batch": stats.largest,
                "cancelled_rows": stats.cancelled}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "prism_lightning"}
                                           for m in models]}

    def route_of(request: SamplingRequest) -> str:
        request.check_supported()
        if request.model not in models:
            raise ApiError(404, f"model {request.model!r} does not exist; served: {', '.join(models)}", "model",
                           "model_not_found")
        return models[request.model]

    def job_for(request: SamplingRequest, prompt_ids: list[int], route: str, asked: Optional[int]) -> Job:
        limit = model.backbone.context_length
        max_tokens = asked or settings.max_tokens
        if asked is None and limit is not None:  # the default budget shrinks to the room left; an asked one is kept
            max_tokens = min(max_tokens, max(limit - len(prompt_ids), 1))
        try:
            model.backbone.check_fits([prompt_ids], max_tokens, names=["the prompt"])
        except PrismError as exc:
            raise ApiError(400, str(exc), "messages", "context_length_exceeded") from None
        temperature = settings.temperature if request.temperature is None else request.temperature
        return Job(prompt_ids, route, max_tokens, temperature,
                   settings.top_p if request.top_p is None else request.top_p, request.seed, request.stops())

    @app.post("/v1/chat/completions")
    async def chat(request: ChatRequest):
        route = route_of(request)
        prompt_ids = model.formatter.conversation_ids(request.conversation())
        job = job_for(request, prompt_ids, route, request.max_completion_tokens or request.max_tokens)
        return await respond(job, request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        route = route_of(request)
        text = request.text()
        if not text:
            raise ApiError(400, "prompt must not be empty", "prompt")
        job = job_for(request, tokenizer(text)["input_ids"], route, request.max_tokens)
        return await respond(job, request, chat=False)

    async def respond(job: Job, request: SamplingRequest, chat: bool):
        rid = response_id("chatcmpl" if chat else "cmpl")
        if not request.stream:
            done = await batcher.submit(job)
            choice = ({"index": 0, "message": {"role": "assistant", "content": done.text},
                       "finish_reason": done.finish_reason, "logprobs": None} if chat else
                      {"index": 0, "text": done.text, "finish_reason": done.finish_reason, "logprobs": None})
            body = envelope("chat.completion" if chat else "text_completion", rid, request.model, [choice],
                            done.route, usage=usage(done.prompt_tokens, done.completion_tokens))
            return JSONResponse(body, headers=route_headers(done.route))
        return await stream(job, request, chat, rid)

    async def stream(job: Job, request: SamplingRequest, chat: bool, rid: str) -> StreamingResponse:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job.on_start = lambda route: loop.call_soon_threadsafe(events.put_nowait, ("start", route))
        job.on_text = lambda text: loop.call_soon_threadsafe(events.put_nowait, ("text", text))
        task = asyncio.create_task(batcher.submit(job))
        # Runs after every event the worker queued: they were scheduled before the batch returned.
        task.add_done_callback(lambda t: events.put_nowait(("end", t)))
        kind, first = await events.get()
        if kind == "end":  # failed before routing: an ordinary error response
            first.result()
        route = first
        kind_name = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: Optional[str], finish: Optional[str], role: bool = False) -> str:
            if chat:
                body = {"role": "assistant", "content": delta or ""} if role else (
                    {} if delta is None else {"content": delta})
                choice = {"index": 0, "delta": body, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            return sse(envelope(kind_name, rid, request.model, [choice], route))

        async def body() -> AsyncIterator[str]:
            try:
                if chat:
                    yield chunk("", None, role=True)
                while True:
                    kind, value = await events.get()
                    if kind == "end":
                        break
                    yield chunk(value, None)
            finally:  # the client left (Starlette cancels the stream): stop generating its row
                if not task.done():
                    job.cancel()
            try:
                done: Completion = value.result()
            except Exception as exc:  # noqa: BLE001 - the stream is open: the error goes in it
                yield sse(ApiError(500, f"generation failed: {exc}", kind="server_error").body())
                yield "data: [DONE]\n\n"
                return
            yield chunk(None, done.finish_reason)
            if request.include_usage():
                yield sse(envelope(kind_name, rid, request.model, [], route,
                                   usage=usage(done.prompt_tokens, done.completion_tokens)))
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream", headers=route_headers(route))

    return app


def sse(payload: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(payload)}\n\n"


def validation_error(exc: RequestValidationError) -> ApiError:
    """FastAPI's validation errors as one OpenAI error naming the field (malformed JSON says so)."""
    errors = exc.errors()
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        return ApiError(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first['msg'])}")
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    return ApiError(400, f"{where}: {message}" if where else message, where or None)
