"""Chat formatting in one place: persona placement, generation prompt, and response token positions."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, Sequence

Placement = Literal["system", "user"]
PLACEMENTS: tuple[str, ...] = ("system", "user")
_PROBE = "PRISM-SYSTEM-PROBE"
_PREFIX_PROBES = ("Alpha?", "Zulu!")  # two queries that differ from their first character
# The backbone loader attaches ``BackboneConfig.chat_template_kwargs`` to its tokenizer under this name, so every
# formatter built on that tokenizer (corpus, training, evaluation, export) renders with them, never without.
_KWARGS_ATTR = "prism_chat_template_kwargs"


def set_template_kwargs(tokenizer: Any, kwargs: Mapping[str, Any]) -> None:
    """Attach extra chat-template variables (e.g. Llama-3.1's ``date_string``) to a tokenizer."""
    setattr(tokenizer, _KWARGS_ATTR, dict(kwargs))


def attached_template_kwargs(tokenizer: Any) -> dict[str, Any]:
    """The chat-template variables attached to ``tokenizer`` (empty when none)."""
    return dict(getattr(tokenizer, _KWARGS_ATTR, None) or {})


def template_fingerprint(tokenizer: Any) -> str:
    """Short hash of the chat template and its variables: what every rendered prompt depends on."""
    template = getattr(tokenizer, "chat_template", None)
    blob = json.dumps([template, attached_template_kwargs(tokenizer)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class EncodedExample:
    """Prompt + response token ids and the positions that align teacher and student.

    ``input_ids[:prompt_len]`` is the prompt ending with the generation prompt; the gate reads the
    hidden state at ``prompt_len - 1``; the response (plus end-of-turn) is ``input_ids[prompt_len:]``.
    """

    input_ids: list[int]
    prompt_len: int

    @property
    def feature_position(self) -> int:
        """Index of the last prompt token after the generation prompt."""
        return self.prompt_len - 1

    @property
    def response_ids(self) -> list[int]:
        """The response token ids, end-of-turn included."""
        return self.input_ids[self.prompt_len:]


class ChatFormatter:
    """Builds chat prompts with no persona, a persona as system message, or a persona prepended to the user turn.

    Without a persona no system message is sent, so the template's own default applies, exactly as at
    inference where the user sends only the query. Templates without a system role (they raise, or drop
    the system text) fall back to user placement. ``template_kwargs`` (extra template variables, default: those
    the backbone loader attached to the tokenizer) go to every ``apply_chat_template`` call.
    """

    def __init__(self, tokenizer: Any, placement: Placement = "system",
                 template_kwargs: Optional[Mapping[str, Any]] = None) -> None:
        if placement not in PLACEMENTS:
            raise ValueError(f"persona placement must be one of {PLACEMENTS}, got {placement!r}")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("tokenizer has no chat_template; set one before formatting chats")
        self.tokenizer = tokenizer
        self.placement: Placement = placement
        self.template_kwargs = attached_template_kwargs(tokenizer) if template_kwargs is None else dict(template_kwargs)
        self.supports_system = self._probe_system_role()

    def _probe_system_role(self) -> bool:
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": "system", "content": _PROBE}, {"role": "user", "content": "hi"}],
                tokenize=False, add_generation_prompt=True, **self.template_kwargs)
        except Exception:  # jinja raises TemplateError from templates that reject a system role
            return False
        return _PROBE in text

    def effective_placement(self, placement: Optional[Placement] = None) -> Placement:
        """The placement actually used: user placement when the template has no system role."""
        chosen = placement or self.placement
        if chosen not in PLACEMENTS:
            raise ValueError(f"persona placement must be one of {PLACEMENTS}, got {chosen!r}")
        return chosen if chosen == "user" or self.supports_system else "user"

    def messages(self, query: str, persona: Optional[str] = None, placement: Optional[Placement] = None,
                 history: Sequence[tuple[str, str]] = ()) -> list[dict]:
        """Chat messages for ``query`` after earlier (user, assistant) turns, with the persona placed as asked."""
        turns: list[dict] = []
        for user, assistant in history:
            turns += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        turns.append({"role": "user", "content": query})
        if persona:
            if self.effective_placement(placement) == "system":
                turns.insert(0, {"role": "system", "content": persona})
            else:
                turns[0] = {"role": "user", "content": f"{persona}\n\n{turns[0]['content']}"}
        return turns

    def prompt_text(self, query: str, persona: Optional[str] = None, placement: Optional[Placement] = None,
                    history: Sequence[tuple[str, str]] = ()) -> str:
        """The rendered prompt, ending with the generation prompt."""
        return self.tokenizer.apply_chat_template(self.messages(query, persona, placement, history),
                                                  tokenize=False, add_generation_prompt=True, **self.template_kwargs)

    def prompt_ids(self, query: str, persona: Optional[str] = None, placement: Optional[Placement] = None,
                   history: Sequence[tuple[str, str]] = ()) -> list[int]:
        """Token ids of the prompt; the template already carries any BOS, so none is added."""
        return self.tokenizer(self.prompt_text(query, persona, placement, history),
                              add_special_tokens=False)["input_ids"]

    def conversation_ids(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of a whole conversation (``{"role", "content"}`` dicts, ending with a user turn) plus the
        generation prompt: what a chat endpoint's client sends."""
        text = self.tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                                  add_generation_prompt=True, **self.template_kwargs)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def context_prefix(self, persona: Optional[str], placement: Optional[Placement] = None) -> list[int]:
        """The prompt tokens that come before any query with this persona: template header and persona block."""
        first, second = (self.prompt_ids(q, persona, placement) for q in _PREFIX_PROBES)
        n = next((i for i, (a, b) in enumerate(zip(first, second)) if a != b), min(len(first), len(second)))
        return first[:n]

    def response_ids(self, response: str) -> list[int]:
        """Token ids of a response followed by end-of-turn, identical whatever the prompt was."""
        ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        return ids + ([eos] if eos is not None else [])

    def encode(self, query: str, response: str, persona: Optional[str] = None,
               placement: Optional[Placement] = None) -> EncodedExample:
        """Prompt and response tokenized separately, so teacher and student share the exact response ids."""
        prompt = self.prompt_ids(query, persona, placement)
        return EncodedExample(input_ids=prompt + self.response_ids(response), prompt_len=len(prompt))
