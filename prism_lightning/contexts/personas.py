"""The persona registry: the paper's 12 domains from one template at three granularities, plus user contexts of
any kind (persona, memory, tools, passages: ``contexts/kinds.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from prism_lightning.contexts.domains import GRANULARITIES, DomainSpec, build_persona_text, domain_table
from prism_lightning.contexts.kinds import KINDS, context_files, kind_spec, read_context, render_block
from prism_lightning.utils.errors import PrismError
from prism_lightning.utils.paths import InputFile, InputPath

# Question kinds for contexts that come from files, where no domain spec says what users ask.
GENERIC_QUESTION_STYLES = (
    "a question that can only be answered well with this context",
    "a practical request for step-by-step help",
    "a question asking to compare two options",
    "a request to explain something to a newcomer",
    "a question about a tricky edge case",
)


@dataclass(frozen=True)
class Persona:
    """One context to distill: its registry name, the block put in the prompt, and where it came from.

    ``kind`` is a context kind (``persona``, ``memory``, ``tools``, ``passages``); ``content`` is the context's own
    text before the kind wraps it into ``text``; ``placement`` is where the kind puts its block (None: the run's).
    """

    name: str
    text: str
    category: str
    spec: Optional[DomainSpec] = None
    kind: str = "persona"
    content: str = ""
    placement: Optional[str] = None

    @property
    def topics(self) -> tuple[str, ...]:
        """Sub-domains used to vary query-generation prompts (empty for file contexts)."""
        return self.spec.subdomains if self.spec else ()

    @property
    def question_styles(self) -> tuple[str, ...]:
        """Kinds of requests this persona gets, for varied query-generation prompts."""
        if self.spec:
            return self.spec.question_styles
        return KINDS[self.kind].question_styles or GENERIC_QUESTION_STYLES

    @property
    def source_text(self) -> str:
        """The context as its file gives it (what stage 1 shows the model when it writes questions)."""
        return self.content or self.text


@dataclass(frozen=True)
class ContextSource:
    """A context given by file: its kind and path (a directory gives one context per file, named by its stem).

    Args:
        kind: ``persona``, ``memory``, ``tools`` (a JSON list of tool schemas, or text) or ``passages``.
        path: a text/JSON file, or a directory of them.
        name: registry name (default: the file's stem); not allowed with a directory.
    """

    kind: str
    path: InputPath
    name: Optional[str] = None


@dataclass(frozen=True)
class PersonaConfig:
    """Which personas a run uses.

    Args:
        names: built-in domains to use (any of the paper's 12); ``["all"]`` for all of them.
        granularity: min (≈5 tokens), half (≈75) or full (≈150).
        files: extra personas as ``name: path`` (text used as given, in the persona's place).
        contexts: contexts of a kind (memory, tools, passages, persona), each placed as that kind is given.
        domains: a YAML file of your own expert domains (the layout of the packaged
            ``prism_lightning/contexts/data/domains.yaml``); its names join the built-in ones in ``names``.
    """

    names: list[str] = field(default_factory=lambda: ["all"])
    granularity: str = "full"
    files: dict[str, InputFile] = field(default_factory=dict)
    contexts: list[ContextSource] = field(default_factory=list)
    domains: Optional[InputFile] = None


class PersonaRegistry:
    """Ordered name → Persona map built from a PersonaConfig; the one place personas are defined."""

    def __init__(self, personas: list[Persona]) -> None:
        if not personas:
            raise PrismError("data.personas: no personas selected; list names or files")
        self._by_name = {p.name: p for p in personas}

    @classmethod
    def from_config(cls, config: PersonaConfig) -> "PersonaRegistry":
        """Build the registry, failing with one line that names the bad key or file."""
        if config.granularity not in GRANULARITIES:
            raise PrismError(f"data.personas.granularity: {config.granularity!r} is not one of {GRANULARITIES}")
        table = domain_table(config.domains)
        names = list(table) if list(config.names) == ["all"] else list(config.names)
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise PrismError(f"data.personas.names: {repeated[0]!r} is listed more than once")
        unknown = [n for n in names if n not in table]
        if unknown:
            raise PrismError(f"data.personas.names: unknown persona {unknown[0]!r}; built-in ones are "
                             f"{', '.join(table)} (add your own with data.personas.domains or data.personas.files)")
        personas = [Persona(n, build_persona_text(table[n], config.granularity), table[n].category,
                            table[n]) for n in names]
        for name, path in config.files.items():
            if name in table:
                raise PrismError(f"data.personas.files.{name}: name already used by a built-in persona")
            personas.append(Persona(name, read_context_file(Path(path), f"data.personas.files.{name}"), "context"))
        for n, source in enumerate(config.contexts):
            personas += contexts_of(source, f"data.personas.contexts[{n}]", table)
        names_seen: set[str] = set()
        for persona in personas:
            if persona.name in names_seen:
                raise PrismError(f"data.personas: two contexts are named {persona.name!r}; give one a `name`")
            names_seen.add(persona.name)
        return cls(personas)

    def __iter__(self) -> Iterator[Persona]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def __getitem__(self, name: str) -> Persona:
        try:
            return self._by_name[name]
        except KeyError:
            raise PrismError(f"persona {name!r} is not in this run's registry ({', '.join(self._by_name)})") \
                from None

    @property
    def names(self) -> list[str]:
        """Persona names in registry order."""
        return list(self._by_name)


def contexts_of(source: ContextSource, key: str,
                table: Optional[dict[str, DomainSpec]] = None) -> list[Persona]:
    """The registry entries of one ``data.personas.contexts`` item (one per file of a directory)."""
    spec = kind_spec(source.kind, f"{key}.kind")
    path = Path(source.path)
    if source.name and path.is_dir():
        raise PrismError(f"{key}.name: a directory gives one context per file, named by its stem; drop the name")
    out = []
    for file in context_files(path, f"{key}.path"):
        content = read_context(spec.name, file, f"{key}.path")
        name = source.name or file.stem
        if name in (table or domain_table(None)):
            raise PrismError(f"{key}: name {name!r} is a built-in persona; give the context another `name`")
        out.append(Persona(name, render_block(spec.name, content), spec.name, kind=spec.name, content=content,
                           placement=spec.placement))
    return out


def read_context_file(path: Path, key: str) -> str:
    """Read a user context file; a missing or empty file is a one-line error naming the key and path."""
    if not path.is_file():
        raise PrismError(f"{key}: persona file not found: {path}")
    return read_context("persona", path, key).strip()
