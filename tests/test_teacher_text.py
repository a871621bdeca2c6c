"""The teacher's persona text comes from the corpus record; unknown personas and changed texts are one line."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from prism_lightning.bootstrap.corpus import Corpus
from prism_lightning.contexts.personas import PersonaConfig, PersonaRegistry
from prism_lightning.training.datamodule import Collator
from prism_lightning.training.teacher_text import teacher_texts
from prism_lightning.utils.errors import PrismError


def corpus(tmp_path: Path, personas: dict[str, str], target: str = "math") -> Corpus:
    items = [{"id": "a", "query": "q", "label": 1, "target_persona": target, "persona": target,
              "persona_answer": "x", "baseline_answer": "y"},
             {"id": "b", "query": "q", "label": 0, "target_persona": target, "persona": target,
              "persona_answer": "x", "baseline_answer": "y"}]
    return Corpus(tmp_path, items, {"personas": personas})


def registry(granularity: str) -> PersonaRegistry:
    return PersonaRegistry.from_config(PersonaConfig(names=["math"], granularity=granularity))


def test_recorded_text_is_the_teachers(tmp_path):
    recorded = {"math": registry("half")["math"].text}
    assert teacher_texts(corpus(tmp_path, recorded), registry("half")) == recorded


def test_a_changed_text_is_one_line_naming_the_override(tmp_path):
    recorded = {"math": registry("half")["math"].text}
    with pytest.raises(PrismError) as err:
        teacher_texts(corpus(tmp_path, recorded), registry("full"))
    message = str(err.value)
    assert "\n" not in message and "manifest.json" in message and "'math'" in message
    assert "data.teacher_text: config" in message


def test_the_explicit_override_uses_the_config_text_and_logs_it(tmp_path, caplog):
    recorded = {"math": registry("half")["math"].text}
    with caplog.at_level(logging.WARNING):
        texts = teacher_texts(corpus(tmp_path, recorded), registry("full"), "config")
    assert texts["math"] == registry("full")["math"].text != recorded["math"]
    assert "data.teacher_text=config" in caplog.text


def test_an_unknown_target_persona_is_one_line(tmp_path):
    recorded = {"math": registry("half")["math"].text}
    with pytest.raises(PrismError, match=r"unknown target persona 'chemistry'"):
        teacher_texts(corpus(tmp_path, recorded, target="chemistry"), registry("half"))


def test_a_manifest_without_texts_is_refused(tmp_path):
    with pytest.raises(PrismError, match="records no persona texts"):
        teacher_texts(corpus(tmp_path, {}), registry("half"))


def test_the_collator_never_builds_a_persona_less_teacher(smol_tokenizer):
    """The reference code's bug: an unknown persona gave the teacher no persona (KL = 0). Now it is an error."""
    from prism_lightning.model.chat import ChatFormatter

    collate = Collator(ChatFormatter(smol_tokenizer), {"math": "You are a mathematician."})
    item = {"id": "a", "query": "q", "label": 1, "target_persona": "writing", "persona_answer": "x",
            "baseline_answer": "y"}
    with pytest.raises(PrismError, match="unknown target persona 'writing'"):
        collate([item])
