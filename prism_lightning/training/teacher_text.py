"""The teacher's persona texts: the ones recorded with the corpus, checked against the run's config."""

from __future__ import annotations

import logging
from typing import Literal

from prism_lightning.bootstrap.corpus import Corpus
from prism_lightning.contexts.personas import PersonaRegistry
from prism_lightning.utils.errors import PrismError

log = logging.getLogger(__name__)

TeacherText = Literal["corpus", "config"]


def teacher_texts(corpus: Corpus, registry: PersonaRegistry, source: TeacherText = "corpus") -> dict[str, str]:
    """Persona name -> text the teacher sees; the corpus's record wins, a differing config text is an error.

    The persona answers were written under the recorded text, so distilling another text (e.g. a fit with
    ``bootstrap: false`` and another granularity) would teach a target the corpus never showed. ``config``
    is the explicit, logged override.
    """
    manifest_path = corpus.directory / "manifest.json"
    recorded = corpus.manifest.get("personas")
    if not isinstance(recorded, dict) or not recorded:
        raise PrismError(f"{manifest_path}: records no persona texts; rebuild the corpus with `prism bootstrap`")
    configured = {p.name: p.text for p in registry}
    texts = dict(recorded)
    for name, text in configured.items():
        if name not in recorded or recorded[name] == text:
            continue
        if source != "config":
            raise PrismError(f"{manifest_path}: persona {name!r} text differs from the one that wrote the corpus "
                             f"answers (data.personas changed?); rerun `prism bootstrap`, or set "
                             f"data.teacher_text: config to distil the configured text anyway")
        log.warning("data.teacher_text=config: persona %r uses the configured text, not the one recorded in %s",
                    name, manifest_path)
        texts[name] = text
    check_targets(corpus, texts)
    return texts


def teacher_placements(corpus: Corpus) -> dict[str, str]:
    """Persona name -> placement for the contexts whose kind fixes one (e.g. passages in the user turn)."""
    placements = corpus.manifest.get("placements") or {}
    return {name: str(placement) for name, placement in placements.items()}


def check_targets(corpus: Corpus, texts: dict[str, str]) -> None:
    """Every distill item's target persona must have a teacher text (else KL would silently be 0)."""
    for item in corpus.items:
        if item["label"] == 1 and item["target_persona"] not in texts:
            raise PrismError(f"{corpus.directory / 'corpus.jsonl'}: item {item['id']}: unknown target persona "
                             f"{item['target_persona']!r}; the corpus manifest records {', '.join(texts)}")
