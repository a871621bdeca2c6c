"""Packaged chat templates, BackboneConfig.chat_template / chat_template_kwargs, and what they change downstream.

The templates are checked against the documented prompt formats of Llama-3.1 Instruct, Mistral-7B-Instruct-v0.3
and DeepSeek-R1(-Distill); the date pin is checked by rendering on two different days.
"""

from __future__ import annotations

import copy
import datetime as dt
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import make_tiny_llama
from jinja2.exceptions import TemplateError

from prism_lightning.model import backbone as bb
from prism_lightning.model.backbone import BackboneConfig, load_backbone
from prism_lightning.model.chat import ChatFormatter, set_template_kwargs, template_fingerprint
from prism_lightning.model.templates import load_chat_template, names
from prism_lightning.utils.errors import PrismError

ROOT = Path(__file__).resolve().parents[1]
LLAMA_HEADER = "<|start_header_id|>{}<|end_header_id|>\n\n"


def _llama_system(date: str, text: str = "") -> str:
    return (LLAMA_HEADER.format("system") + f"Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
            + text + "<|eot_id|>")


# =========================================================================== the packaged templates
def test_packaged_names_and_errors(tmp_path):
    assert names() == ["deepseek-r1", "llama-3.1", "mistral-v0.3"]
    own = tmp_path / "mine.jinja"
    own.write_text("{{ messages[0]['content'] }}")
    assert load_chat_template(str(own)) == own.read_text()
    with pytest.raises(PrismError, match=r"backbone\.chat_template: 'llama-9'.*llama-3\.1"):
        load_chat_template("llama-9")
    with pytest.raises(PrismError, match="backbone.chat_template"):
        BackboneConfig(chat_template="llama-9")  # fails with the config, not at first use


def test_llama31_format(llama3_tokenizer):
    formatter = ChatFormatter(llama3_tokenizer)
    assert formatter.prompt_text("Hi there ", "Be brief.") == (
        "<|begin_of_text|>" + _llama_system("26 Jul 2024", "Be brief.") + LLAMA_HEADER.format("user")
        + "Hi there<|eot_id|>" + LLAMA_HEADER.format("assistant"))
    # no persona: the template's own system turn (dates only) still opens the conversation
    assert formatter.prompt_text("Hi") == ("<|begin_of_text|>" + _llama_system("26 Jul 2024")
                                           + LLAMA_HEADER.format("user") + "Hi<|eot_id|>"
                                           + LLAMA_HEADER.format("assistant"))
    ids = formatter.prompt_ids("Hi")
    special = llama3_tokenizer.convert_tokens_to_ids(["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>"])
    assert ids[0] == special[0] and ids.count(special[1]) == 2 and ids.count(special[2]) == 3


def test_mistral_v03_format(mistral_tokenizer):
    formatter = ChatFormatter(mistral_tokenizer)
    assert formatter.supports_system  # v0.3 puts a system message into the last user turn
    text = formatter.prompt_text("Q2", "SYS", history=[("Q1", "  A1 ")])
    assert text == "<s>[INST] Q1[/INST] A1</s>[INST] SYS\n\nQ2[/INST]"
    assert formatter.prompt_text("Q", "P", placement="user") == "<s>[INST] P\n\nQ[/INST]"
    with pytest.raises(TemplateError, match="alternate"):
        mistral_tokenizer.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                                              tokenize=False)
    ids = formatter.prompt_ids("Q")
    assert ids[0] == mistral_tokenizer.bos_token_id and ids[-1] == mistral_tokenizer.convert_tokens_to_ids("[/INST]")


def test_deepseek_r1_format(llama3_tokenizer):
    tok = copy.deepcopy(llama3_tokenizer)
    tok.chat_template = load_chat_template("deepseek-r1")
    formatter = ChatFormatter(tok)
    text = formatter.prompt_text("Q2", "SYS", history=[("Q1", "<think>\nplan\n</think>\n\nA1")])
    assert text == ("<|begin_of_text|>SYS<｜User｜>Q1<｜Assistant｜>\n\nA1<｜end▁of▁sentence｜>"
                    "<｜User｜>Q2<｜Assistant｜><think>\n")


# =========================================================================== chat_template_kwargs: the date pin
def _strftime_variant() -> str:
    """Llama-3.1's template as newer Llama releases write it: today's date unless ``date_string`` is passed."""
    packaged = load_chat_template("llama-3.1")
    variant = packaged.replace('{%- set date_string = "26 Jul 2024" -%}',
                               '{%- set date_string = strftime_now("%d %b %Y") -%}')
    assert variant != packaged
    return variant


def _on_day(monkeypatch, day: dt.datetime) -> None:
    """Make the template helper ``strftime_now`` see ``day`` as now."""
    import transformers.utils.chat_template_utils as ctu

    monkeypatch.setattr(ctu, "datetime", SimpleNamespace(now=lambda *a, **k: day))


def test_pinned_date_renders_the_same_ids_on_different_days(llama3_tokenizer, monkeypatch):
    tok = copy.deepcopy(llama3_tokenizer)
    tok.chat_template = _strftime_variant()
    days = [dt.datetime(2031, 3, 4), dt.datetime(2032, 11, 30)]

    def render(kwargs) -> list[list[int]]:
        out = []
        for day in days:
            _on_day(monkeypatch, day)
            out.append(ChatFormatter(tok, template_kwargs=kwargs).prompt_ids("Hello", "Be brief."))
        return out

    unpinned = render({})
    assert unpinned[0] != unpinned[1]  # the date really moves the prompt: the pin below has work to do
    assert "04 Mar 2031" in tok.decode(unpinned[0])
    pinned = render({"date_string": "26 Jul 2024"})
    assert pinned[0] == pinned[1]
    # and the pinned prompt is the one the packaged (fixed-date) template renders
    assert pinned[0] == ChatFormatter(llama3_tokenizer).prompt_ids("Hello", "Be brief.")


def test_kwargs_attached_to_a_tokenizer_reach_every_formatter(llama3_tokenizer):
    tok = copy.deepcopy(llama3_tokenizer)
    set_template_kwargs(tok, {"date_string": "01 Jan 2030"})
    formatter = ChatFormatter(tok)
    assert "Today Date: 01 Jan 2030" in formatter.prompt_text("Hi")
    assert formatter.template_kwargs == {"date_string": "01 Jan 2030"}
    # an explicit argument wins over the attached one
    explicit = ChatFormatter(tok, template_kwargs={"date_string": "02 Feb 2031"})
    assert "Today Date: 02 Feb 2031" in explicit.prompt_text("Hi")


def test_load_backbone_applies_the_template_after_loading(llama3_tokenizer, monkeypatch):
    raw = copy.deepcopy(llama3_tokenizer)
    raw.chat_template = "{{ 'the tokenizer own template' }}"
    monkeypatch.setattr(bb, "_load", lambda config: (make_tiny_llama(len(raw)), raw))
    config = BackboneConfig(name_or_path=f"tiny-template-{uuid.uuid4().hex}", chat_template="llama-3.1",
                            chat_template_kwargs={"date_string": "01 Jan 2030"})
    try:
        backbone = load_backbone(config)
        assert backbone.tokenizer.chat_template == load_chat_template("llama-3.1")
        assert "Today Date: 01 Jan 2030" in ChatFormatter(backbone.tokenizer).prompt_text("Hi")
        assert load_backbone(config) is backbone  # a dict field still makes a usable cache key
    finally:
        bb._LOADED.pop(bb.cache_key(config), None)


# =========================================================================== stage hashes follow the template
def test_stage_hashes_change_with_the_template(smol_tokenizer, llama3_tokenizer, tmp_path):
    from prism_lightning.bootstrap.config import AnswerConfig, JudgeConfig, QueryConfig
    from prism_lightning.bootstrap.corpus import CorpusBuilder
    from prism_lightning.contexts.personas import PersonaConfig

    builder = CorpusBuilder(BackboneConfig(), PersonaConfig(), QueryConfig(), AnswerConfig(), JudgeConfig(),
                            "system", tmp_path)
    dated = copy.deepcopy(llama3_tokenizer)
    set_template_kwargs(dated, {"date_string": "01 Jan 2030"})
    model = SimpleNamespace(fingerprint="f", tokenizer=llama3_tokenizer)
    same_weights_new_date = SimpleNamespace(fingerprint="f", tokenizer=dated)
    assert template_fingerprint(llama3_tokenizer) != template_fingerprint(dated)
    base = builder.stage_hashes(model, model)
    assert builder.stage_hashes(model, model) == base
    moved = builder.stage_hashes(same_weights_new_date, same_weights_new_date)
    assert all(moved[k] != base[k] for k in base)
    # only the judge's template changed: queries and answers are kept, the judge stage is redone
    judged = builder.stage_hashes(model, same_weights_new_date)
    assert judged["queries"] == base["queries"] and judged["answers"] == base["answers"]
    assert judged["judge"] != base["judge"]
    # a judge whose tokenizer encodes the verdicts differently stores different records
    other = SimpleNamespace(fingerprint="f", tokenizer=copy.deepcopy(smol_tokenizer))
    other.tokenizer.chat_template = llama3_tokenizer.chat_template
    assert builder.stage_hashes(model, other)["judge"] != base["judge"]


# =========================================================================== the model configs
def _data(name: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / "models" / name).read_text())["data"]


def test_llama_config_pins_the_date():
    assert _data("llama-3.1-8b-instruct.yaml")["backbone"]["chat_template_kwargs"] == {"date_string": "26 Jul 2024"}


@pytest.mark.parametrize("name", ["deepseek-r1-distill-llama-8b.yaml", "deepseek-r1-distill-qwen-7b.yaml"])
def test_r1_configs_judge_with_a_non_reasoning_model(name):
    data = _data(name)
    judge = data["judge"]["model"]["name_or_path"]
    assert "R1" not in judge and judge != data["backbone"]["name_or_path"]
    assert data["benchmark"]["judge"]["name_or_path"] == judge and data["benchmark"]["mmlu"] == ""
