"""Context kinds: how a persona, a user memory, a tool registry or retrieved passages are placed in a prompt and
which questions stage 1 writes for them. One spec per kind; the chat formatter places the rendered block."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from prism_lightning.utils.errors import PrismError
from prism_lightning.utils.jsonl import read_text

KINDS_ORDER = ("persona", "memory", "tools", "passages")
_SUFFIXES = (".txt", ".md", ".json")


@dataclass(frozen=True)
class KindSpec:
    """One context kind.

    ``block`` wraps the file's text into what the prompt carries (``{text}``); ``placement`` is where that block
    goes (None: the run's ``data.placement``); ``curator`` is stage 1's system prompt; ``inside_frames`` ask for
    questions the context answers, ``outside_frames`` for questions it does not help with (one candidate in
    ``outside_every`` is such a question, so the gate sees both). Frames use ``{context}``, ``{topic}``, ``{style}``.
    A persona's outside questions are knowledge questions (short factual or multiple-choice), written only under
    the ``intent`` judge protocol (``outside_every`` 0: its cadence comes from ``data.queries.knowledge_every``);
    ``outside_in_domain`` puts every other one in the context's own topics instead of general ones.
    """

    name: str
    block: str
    placement: Optional[str]
    curator: str
    inside_frames: tuple[str, ...]
    outside_frames: tuple[str, ...] = ()
    question_styles: tuple[str, ...] = ()
    outside_every: int = 0
    outside_in_domain: bool = False


_OUTSIDE_TOPICS = ("cooking", "history", "physics", "travel", "personal finance", "gardening", "grammar",
                   "sports", "geography", "health and fitness")

KINDS: dict[str, KindSpec] = {
    "persona": KindSpec(
        name="persona", block="{text}", placement=None,
        curator=("You curate evaluation data. You write one realistic, specific question that a user would bring to "
                 "the expert described below, and nothing else."),
        inside_frames=(
            "Expert description:\n{context}\n\nWrite one question about {topic}: {style}. Output only the question.",
            "Here is an expert:\n{context}\n\nA user needs this expert's help with {topic}. Write the user's message "
            "— {style}. Output only the message.",
            "{context}\n\nInvent {style} that a real person might ask about {topic}. Reply with the question alone.",
            "Think of a user who needs the expert below.\n{context}\n\nTheir request concerns {topic} and is {style}. "
            "Write that request in one or two sentences, with no preamble.",
        ),
        # Knowledge questions: one right answer that a reference book holds, no expertise in how to answer.
        outside_frames=(
            "Write one short factual question about {topic} that has a single correct answer (a name, a date, a "
            "number or a definition). Output only the question.",
            "Write one multiple-choice question about {topic} with four options labelled A, B, C and D, exactly one "
            "of them correct. Output only the question and its options.",
            "Write one short quiz question that tests what a student knows about {topic}. Output only the question.",
        ),
        outside_in_domain=True,
    ),
    "memory": KindSpec(
        name="memory",
        block=("Memory: what you know about the user from earlier conversations. Use it whenever it is relevant.\n\n"
               "{text}"),
        placement=None,
        curator="You write one realistic message that a user sends to their personal assistant, and nothing else.",
        inside_frames=(
            "The assistant remembers these notes about the user:\n{context}\n\nWrite {style} whose answer depends on "
            "one of these notes. The user writes in the first person. Output only the message.",
            "Notes about a user:\n{context}\n\nWrite the user's message: {style} that only someone who knows these "
            "notes could answer well. Output only the message.",
        ),
        outside_frames=(
            "Write one question about {topic} that a user might ask a general assistant. Output only the question.",
        ),
        question_styles=("a question asking the assistant to recall a detail about the user",
                         "a request for a suggestion that should take the user's situation into account",
                         "a short question about the user's own plans or preferences"),
        outside_every=3,
    ),
    "tools": KindSpec(
        name="tools",
        block=("You can call the tools below. To call one, reply with <tool_call>{{\"name\": ..., \"arguments\": "
               "{{...}}}}</tool_call>.\n\n<tools>\n{text}\n</tools>"),
        placement=None,
        curator="You write one realistic request that a user sends to an assistant with tools, and nothing else.",
        inside_frames=(
            "An assistant can call these tools:\n{context}\n\nWrite {style} that one of these tools would serve. Do "
            "not name the tool. Output only the request.",
            "Tools available:\n{context}\n\nWrite a user's message: {style} that needs one of these tools. Output "
            "only the message.",
        ),
        outside_frames=(
            "Write one question about {topic} that needs no tool, only knowledge. Output only the question.",
        ),
        question_styles=("a concrete request with specific values", "a short everyday request",
                         "a request phrased as a question"),
        outside_every=3,
    ),
    "passages": KindSpec(
        name="passages",
        block=("Answer using the retrieved passages below where they are relevant.\n\n<passages>\n{text}\n"
               "</passages>"),
        placement="user",
        curator="You write one realistic question that a user asks about documents, and nothing else.",
        inside_frames=(
            "Passages:\n{context}\n\nWrite {style} that these passages answer. Output only the question.",
            "Read these passages:\n{context}\n\nWrite a user's question — {style} — whose answer is in them. Output "
            "only the question.",
        ),
        outside_frames=(
            "Write one question about {topic} that a user might ask a general assistant. Output only the question.",
        ),
        question_styles=("a factual question about a detail", "a question asking for a short summary",
                         "a question comparing two things the passages mention"),
        outside_every=3,
    ),
}


def kind_spec(kind: str, key: str) -> KindSpec:
    """The spec of ``kind``; an unknown kind is a one-line error naming the config key."""
    try:
        return KINDS[kind]
    except KeyError:
        raise PrismError(f"{key}: unknown context kind {kind!r}; one of {', '.join(KINDS_ORDER)}") from None


def render_block(kind: str, text: str) -> str:
    """The block the prompt carries for a context of ``kind`` whose file holds ``text``."""
    return KINDS[kind].block.format(text=text)


def candidate_frame(kind: str, index: int, topics: tuple[str, ...], styles: tuple[str, ...],
                    knowledge_every: int = 0) -> tuple[str, str]:
    """The index-th stage-1 prompt frame of a kind, filled except for ``{context}``, and its intent.

    Intent is ``inside`` (the context answers it) or ``outside`` (a question the context does not help with; for a
    persona, a knowledge question). ``knowledge_every`` is the cadence of outside questions for a kind that has no
    cadence of its own (a persona; 0: none, the paper's stage 1).
    """
    spec = KINDS[kind]
    every = spec.outside_every or (knowledge_every if spec.outside_frames else 0)
    outside = every > 0 and index % every == every - 1
    frames = spec.outside_frames if outside else spec.inside_frames
    own = topics or ("the subject of the context",)
    if outside:
        # In-domain knowledge questions on every other outside slot: the gate must learn intent, not topic.
        topics = own if spec.outside_in_domain and (index // every) % 2 == 0 else _OUTSIDE_TOPICS
    else:
        topics = own
    styles = styles or spec.question_styles
    frame = frames[index % len(frames)]
    topic = topics[(index // len(frames)) % len(topics)]
    style = styles[(index * 7 + index // len(topics)) % len(styles)]
    return frame.replace("{topic}", topic).replace("{style}", style), "outside" if outside else "inside"


def read_context(kind: str, path: Path, key: str) -> str:
    """The text of one context file: a JSON tool list becomes one tool per line; empty files are an error."""
    if not path.is_file():
        raise PrismError(f"{key}: context file not found: {path}")
    text = read_text(path, f"{key}: context file").strip()
    if not text:
        raise PrismError(f"{key}: context file is empty: {path}")
    if kind == "tools" and path.suffix == ".json":
        return tool_lines(text, path)
    return text


def tool_lines(text: str, path: Path) -> str:
    """A JSON list of tool schemas (``name``, ``description``, ``parameters``) as one compact JSON object a line."""
    try:
        tools = json.loads(text)
    except json.JSONDecodeError as error:
        raise PrismError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(tools, list) or not tools:
        raise PrismError(f"{path}: expected a non-empty JSON list of tools")
    for n, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
            raise PrismError(f"{path}: tool {n} has no \"name\"")
    return "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)


def context_files(path: Path, key: str) -> list[Path]:
    """One file, or every .txt/.md/.json file of a directory (sorted); a directory with none is an error."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _SUFFIXES)
        if not files:
            raise PrismError(f"{key}: directory {path} holds no {'/'.join(_SUFFIXES)} context files")
        return files
    return [path]
