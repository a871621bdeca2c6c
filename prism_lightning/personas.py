"""The persona registry: the paper's 12 domains from one template at three granularities, plus user context files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from prism_lightning.errors import PrismError
from prism_lightning.jsonl import read_text
from prism_lightning.persona_specs import DOMAINS, GRANULARITIES, DomainSpec, build_persona_text

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
    """One context to distill: its registry name, the text put in the prompt, and where it came from."""

    name: str
    text: str
    category: str
    spec: Optional[DomainSpec] = None

    @property
    def topics(self) -> tuple[str, ...]:
        """Sub-domains used to vary query-generation prompts (empty for file contexts)."""
        return self.spec.subdomains if self.spec else ()

    @property
    def question_styles(self) -> tuple[str, ...]:
        """Kinds of requests this persona gets, for varied query-generation prompts."""
        return self.spec.question_styles if self.spec else GENERIC_QUESTION_STYLES


@dataclass(frozen=True)
class PersonaConfig:
    """Which personas a run uses.

    Args:
        names: built-in domains to use (any of the paper's 12); ``["all"]`` for all of them.
        granularity: min (≈5 tokens), half (≈75) or full (≈150).
        files: extra contexts as ``name: path`` — a persona, a retrieved passage, a tool list, a memory.
    """

    names: list[str] = field(default_factory=lambda: ["all"])
    granularity: str = "full"
    files: dict[str, str] = field(default_factory=dict)


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
        names = list(DOMAINS) if list(config.names) == ["all"] else list(config.names)
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise PrismError(f"data.personas.names: {repeated[0]!r} is listed more than once")
        unknown = [n for n in names if n not in DOMAINS]
        if unknown:
            raise PrismError(f"data.personas.names: unknown persona {unknown[0]!r}; built-in ones are "
                             f"{', '.join(DOMAINS)} (add your own under data.personas.files)")
        personas = [Persona(n, build_persona_text(DOMAINS[n], config.granularity), DOMAINS[n].category,
                            DOMAINS[n]) for n in names]
        for name, path in config.files.items():
            if name in DOMAINS:
                raise PrismError(f"data.personas.files.{name}: name already used by a built-in persona")
            personas.append(Persona(name, read_context_file(Path(path), f"data.personas.files.{name}"), "context"))
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


def read_context_file(path: Path, key: str) -> str:
    """Read a user context file; a missing or empty file is a one-line error naming the key and path."""
    if not path.is_file():
        raise PrismError(f"{key}: persona file not found: {path}")
    text = read_text(path, f"{key}: persona file").strip()
    if not text:
        raise PrismError(f"{key}: persona file is empty: {path}")
    return text
