"""The four systems of the paper's table: Base, Expert prompting (matched / fixed persona), Ungated LoRA, PRISM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from prism_lightning.contexts.personas import PersonaRegistry

MATCHED = "matched"


@dataclass(frozen=True)
class Row:
    """One system under test: which route the model takes and which persona (if any) is in the prompt.

    ``persona`` is None (no persona), ``matched`` (the category's persona) or a registry name (fixed persona).
    """

    name: str
    route: str
    persona: Optional[str] = None

    def persona_text(self, registry: PersonaRegistry, category_persona: Optional[str]) -> Optional[str]:
        """The persona text to put in the prompt for an item whose category maps to ``category_persona``."""
        if self.persona is None:
            return None
        name = category_persona if self.persona == MATCHED else self.persona
        return registry[name].text if name is not None and name in registry.names else None


def default_rows(fixed_persona: Optional[str] = "helpful") -> list[Row]:
    """Base; Expert (matched); Expert (one fixed persona, unless None); Ungated LoRA; PRISM."""
    fixed = [Row(f"Expert ({fixed_persona})", "base", fixed_persona)] if fixed_persona else []
    return [Row("Base", "base"), Row("Expert (matched)", "base", MATCHED), *fixed, Row("Ungated LoRA", "adapter"),
            Row("PRISM", "gate")]
