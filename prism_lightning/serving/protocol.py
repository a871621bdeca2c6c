"""The OpenAI request schema the server accepts (the fields it honours; others are ignored, as OpenAI-compatible
servers do), its error shape, and the response bodies."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

CHAT_ROLES = ("system", "developer", "user", "assistant")


class ApiError(Exception):
    """A request the server refuses: HTTP status and OpenAI's ``{"error": {...}}`` body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        """OpenAI's error shape."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class Message(BaseModel):
    """A chat message; ``content`` as a string or as OpenAI's list of text parts."""

    model_config = ConfigDict(extra="allow")
    role: str
    content: Union[str, list[dict[str, Any]], None] = None

    def text(self) -> str:
        """The message's text (text parts joined; other part types are refused)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ApiError(400, f"content part of type {part.get('type')!r} is not supported (text only)",
                               "messages")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class SamplingRequest(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None

    @field_validator("max_tokens")
    @classmethod
    def _positive(cls, value: Optional[int]) -> Optional[int]:
        if value is not None and value <= 0:
            raise ValueError("max_tokens must be at least 1")
        return value

    @field_validator("n")
    @classmethod
    def _one(cls, value: int) -> int:
        if value != 1:
            raise ValueError("n must be 1 (send one request per completion)")
        return value

    def check_supported(self) -> None:
        """Refuse the OpenAI options this server does not implement, rather than ignore them silently."""
        extra = self.model_extra or {}
        for key in ("logprobs", "top_logprobs", "echo", "tools", "functions", "suffix"):
            if extra.get(key):
                raise ApiError(400, f"{key} is not supported by prism serve", key)
        if (extra.get("best_of") or 1) > 1:
            raise ApiError(400, "best_of is not supported by prism serve (send one request per completion)",
                           "best_of")

    def stops(self) -> tuple[str, ...]:
        """The stop strings (OpenAI allows up to 4)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise ApiError(400, "stop takes at most 4 strings", "stop")
        return tuple(s for s in stops if s)

    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk (``stream_options.include_usage``)."""
        return bool((self.stream_options or {}).get("include_usage"))


class ChatRequest(SamplingRequest):
    """``POST /v1/chat/completions``."""

    messages: list[Message]
    max_completion_tokens: Optional[int] = None

    @field_validator("max_completion_tokens")
    @classmethod
    def _positive_completion(cls, value: Optional[int]) -> Optional[int]:
        if value is not None and value <= 0:
            raise ValueError("max_completion_tokens must be at least 1")
        return value

    def conversation(self) -> list[dict]:
        """The messages as ``{"role", "content"}`` dicts, checked: known roles, ending with a user turn."""
        if not self.messages:
            raise ApiError(400, "messages must not be empty", "messages")
        turns = []
        for index, message in enumerate(self.messages):
            if message.role not in CHAT_ROLES:
                raise ApiError(400, f"messages[{index}].role {message.role!r} is not one of {', '.join(CHAT_ROLES)}",
                               f"messages[{index}].role")
            role = "system" if message.role == "developer" else message.role
            turns.append({"role": role, "content": message.text()})
        if turns[-1]["role"] != "user":
            raise ApiError(400, "the last message must be the user's", "messages")
        return turns


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions`` (one prompt string)."""

    prompt: Union[str, list[str]]

    def text(self) -> str:
        """The prompt (a one-element list is accepted; several prompts are one request each)."""
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise ApiError(400, "prompt must be one string (send one request per prompt)", "prompt")
            return self.prompt[0]
        return self.prompt


def response_id(prefix: str) -> str:
    """An id in OpenAI's style (``chatcmpl-…``, ``cmpl-…``)."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """OpenAI's usage object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(kind: Literal["chat.completion", "chat.completion.chunk", "text_completion"], rid: str, model: str,
             choices: list[dict], route: dict, **extra: Any) -> dict:
    """A response or chunk body, with the route in the ``prism`` field."""
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices,
            "prism": route, **extra}
