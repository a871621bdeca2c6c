"""The expert domains behind the personas, read from data: one template at three granularities (``min`` one short
sentence, ``half`` three to four sentences, ``full`` one second-person paragraph) and a domain's fields rendered
into it. The paper's 12 domains ship in ``contexts/data/domains.yaml``; users add theirs in a file of the same
layout (``data.personas.domains``)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import yaml

from prism_lightning.utils.errors import PrismError

BUILTIN_FILE = Path(__file__).parent / "data" / "domains.yaml"
GRANULARITIES: tuple[str, ...] = ("min", "half", "full")


@dataclass(frozen=True)
class DomainSpec:
    """Ingredients for one expert persona; all texts are clauses for the templates."""

    name: str
    role: str
    qualifier: str
    priority: str
    subdomains: tuple[str, ...]
    style: str
    pitfalls: tuple[str, ...]
    value: str
    category: str
    question_styles: tuple[str, ...]


_LISTS = {"subdomains", "pitfalls", "question_styles"}
_FIELDS = [f.name for f in fields(DomainSpec) if f.name != "name"]


def _read(path: Path, key: str) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PrismError(f"{key}: domains file not found: {path}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise PrismError(f"{key}: {path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict) or not isinstance(data.get("domains"), dict) or not data["domains"]:
        raise PrismError(f"{key}: {path}: expected a mapping with a non-empty `domains:` mapping of name -> fields")
    return data


def _spec(name: Any, entry: Any, where: str) -> DomainSpec:
    if not isinstance(name, str) or not name.strip():
        raise PrismError(f"{where}: a domain name must be a non-empty string, got {name!r}")
    if not isinstance(entry, dict):
        raise PrismError(f"{where}.{name}: expected a mapping of {', '.join(_FIELDS)}")
    missing = [f for f in _FIELDS if f not in entry]
    unknown = sorted(set(entry) - set(_FIELDS))
    if missing or unknown:
        what = f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(unknown)}"
        raise PrismError(f"{where}.{name}: {what} (fields: {', '.join(_FIELDS)})")
    values: dict[str, Any] = {}
    for field_name in _FIELDS:
        value = entry[field_name]
        if field_name in _LISTS:
            if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
                raise PrismError(f"{where}.{name}.{field_name}: expected a non-empty list of texts")
            value = tuple(value)
        elif not isinstance(value, str) or not value.strip():
            raise PrismError(f"{where}.{name}.{field_name}: expected a non-empty text")
        values[field_name] = value
    return DomainSpec(name=name, **values)


def load_domains(path: Path, key: str = "data.personas.domains") -> dict[str, DomainSpec]:
    """The domains of one file, checked entry by entry (one line naming the file and entry on a mistake)."""
    data = _read(path, key)
    return {name: _spec(name, entry, f"{path}: domains") for name, entry in data["domains"].items()}


@lru_cache(maxsize=None)
def _templates() -> dict[str, str]:
    data = _read(BUILTIN_FILE, "packaged domains")
    templates = data.get("templates")
    if not isinstance(templates, dict) or set(templates) != set(GRANULARITIES):
        raise PrismError(f"{BUILTIN_FILE}: `templates:` must give exactly {', '.join(GRANULARITIES)}")
    return {g: templates[g] for g in GRANULARITIES}


DOMAINS: dict[str, DomainSpec] = load_domains(BUILTIN_FILE, "packaged domains")


def domain_table(extra: Optional[str], key: str = "data.personas.domains") -> dict[str, DomainSpec]:
    """The built-in domains plus those of a user file (a name clash with a built-in one is an error)."""
    if not extra:
        return DOMAINS
    path = Path(extra).expanduser()
    if "templates" in _read(path, key):
        raise PrismError(f"{key}: {path}: `templates:` is shared by every persona and comes from the packaged "
                         f"registry; give only `domains:`")
    own = load_domains(path, key)
    clash = sorted(set(own) & set(DOMAINS))
    if clash:
        raise PrismError(f"{key}: {path}: domain {clash[0]!r} is a built-in persona; give it another name")
    return {**DOMAINS, **own}


# Spelling-based exceptions to the vowel rule for choosing "a"/"an".
_AN_PREFIXES = ("hour", "honest", "honou", "heir")
_A_PREFIXES = ("uni", "use", "usu", "uti", "eu", "one", "once")


def _article(phrase: str) -> str:
    word = phrase.strip().lower()
    if word.startswith(_AN_PREFIXES):
        return "an"
    if word.startswith(_A_PREFIXES):
        return "a"
    return "an" if word[:1] in "aeiou" else "a"


def _join(items: tuple[str, ...]) -> str:
    if len(items) <= 2:
        return " and ".join(items)
    return ", ".join(items[:-1]) + ", and " + items[-1]


def build_persona_text(spec: DomainSpec, granularity: str) -> str:
    """Render the persona text for ``spec`` at granularity "min", "half" or "full"."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; expected one of {', '.join(GRANULARITIES)}")
    qualified = f"{spec.qualifier} {spec.role}"
    values = {
        "name": spec.name,
        "role": spec.role,
        "qualifier": spec.qualifier,
        "priority": spec.priority,
        "subdomains": _join(spec.subdomains),
        "subdomains_short": _join(spec.subdomains[:4]),
        "style": spec.style,
        "pitfalls": _join(spec.pitfalls),
        "value": spec.value,
        "category": spec.category,
        "a_role": f"{_article(spec.role)} {spec.role}",
        "a_qualified_role": f"{_article(qualified)} {qualified}",
    }
    return _templates()[granularity].format(**values)
