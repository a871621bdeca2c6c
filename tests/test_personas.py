"""The persona registry: the paper's 12 domains at three granularities plus user context files."""

from __future__ import annotations

import pytest
import yaml

from prism_lightning.contexts.domains import DOMAINS, GRANULARITIES, build_persona_text
from prism_lightning.contexts.personas import GENERIC_QUESTION_STYLES, PersonaConfig, PersonaRegistry
from prism_lightning.utils.errors import PrismError

PAPER_PERSONAS = ["coding", "math", "reasoning", "writing", "extraction", "roleplay", "stem", "humanities",
                  "helpful", "compliant", "critic", "safety_monitor"]


def test_all_gives_the_twelve_paper_personas_in_order():
    registry = PersonaRegistry.from_config(PersonaConfig(names=["all"]))
    assert registry.names == PAPER_PERSONAS
    assert len(registry) == 12
    assert [p.name for p in registry] == PAPER_PERSONAS
    assert PersonaRegistry.from_config(PersonaConfig()).names == PAPER_PERSONAS  # "all" is the default
    categories = [p.category for p in registry]
    assert categories == ["task"] * 8 + ["behavioural"] * 4
    for persona in registry:
        assert persona.spec is DOMAINS[persona.name]
        assert persona.text == build_persona_text(DOMAINS[persona.name], "full")
        assert persona.topics == DOMAINS[persona.name].subdomains and persona.topics
        assert persona.question_styles == DOMAINS[persona.name].question_styles


def test_selected_names_keep_the_requested_order():
    registry = PersonaRegistry.from_config(PersonaConfig(names=["critic", "math"], granularity="min"))
    assert registry.names == ["critic", "math"]
    assert registry["math"].text == "You are a mathematician."


@pytest.mark.parametrize("name", PAPER_PERSONAS)
def test_granularity_word_counts_are_ordered(name):
    texts = {g: PersonaRegistry.from_config(PersonaConfig(names=[name], granularity=g))[name].text
             for g in GRANULARITIES}
    words = {g: len(t.split()) for g, t in texts.items()}
    assert words["min"] < words["half"] < words["full"]
    assert texts["min"].startswith("You are a") and texts["min"].endswith(".")
    assert DOMAINS[name].role in texts["min"]
    for text in texts.values():
        assert "{" not in text and "}" not in text  # every template field was filled


def test_unknown_name_raises_naming_the_key():
    with pytest.raises(PrismError, match="data.personas.names") as info:
        PersonaRegistry.from_config(PersonaConfig(names=["math", "astrology"]))
    assert "astrology" in str(info.value)


@pytest.mark.parametrize("granularity", ["medium", "FULL", ""])
def test_bad_granularity_raises_naming_the_key(granularity):
    with pytest.raises(PrismError, match="data.personas.granularity"):
        PersonaRegistry.from_config(PersonaConfig(granularity=granularity))


def test_context_file_is_registered_with_its_text(tmp_path):
    ctx = tmp_path / "memory.md"
    ctx.write_text("\n  The user is a vegetarian living in Lisbon.\nThey prefer metric units.  \n\n",
                   encoding="utf-8")
    registry = PersonaRegistry.from_config(PersonaConfig(names=["coding"], files={"memory": str(ctx)}))
    assert registry.names == ["coding", "memory"]
    persona = registry["memory"]
    assert persona.text == "The user is a vegetarian living in Lisbon.\nThey prefer metric units."
    assert persona.category == "context"
    assert persona.spec is None and persona.topics == ()
    assert persona.question_styles == GENERIC_QUESTION_STYLES


def test_files_only_registry(tmp_path):
    ctx = tmp_path / "tools.txt"
    ctx.write_text("search(query): web search")
    registry = PersonaRegistry.from_config(PersonaConfig(names=[], files={"tools": str(ctx)}))
    assert registry.names == ["tools"]


def test_empty_selection_raises():
    with pytest.raises(PrismError, match="no personas"):
        PersonaRegistry.from_config(PersonaConfig(names=[]))


def test_missing_file_raises_naming_the_key(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(PrismError) as info:
        PersonaRegistry.from_config(PersonaConfig(names=["math"], files={"notes": str(missing)}))
    message = str(info.value)
    assert "data.personas.files.notes" in message and "not found" in message and str(missing) in message


def test_directory_instead_of_file_raises(tmp_path):
    with pytest.raises(PrismError, match="data.personas.files.notes"):
        PersonaRegistry.from_config(PersonaConfig(names=["math"], files={"notes": str(tmp_path)}))


@pytest.mark.parametrize("content", ["", "   \n\t\n"])
def test_empty_file_raises(tmp_path, content):
    ctx = tmp_path / "empty.txt"
    ctx.write_text(content)
    with pytest.raises(PrismError, match="empty") as info:
        PersonaRegistry.from_config(PersonaConfig(names=["math"], files={"blank": str(ctx)}))
    assert "data.personas.files.blank" in str(info.value)


def test_file_named_like_a_builtin_raises(tmp_path):
    ctx = tmp_path / "math.txt"
    ctx.write_text("A different math persona.")
    with pytest.raises(PrismError, match="data.personas.files.math"):
        PersonaRegistry.from_config(PersonaConfig(names=["all"], files={"math": str(ctx)}))
    with pytest.raises(PrismError, match="already used"):
        PersonaRegistry.from_config(PersonaConfig(names=["coding", "math"], files={"math": str(ctx)}))


def test_unknown_lookup_raises():
    registry = PersonaRegistry.from_config(PersonaConfig(names=["math"]))
    with pytest.raises(PrismError, match="'coding'"):
        registry["coding"]


def _domain(**changes) -> dict:
    entry = {"role": "lawyer", "qualifier": "careful", "priority": "precision matters more than speed",
             "subdomains": ["contracts", "torts"], "style": "cite the rule, then apply it",
             "pitfalls": ["jurisdiction mix-ups"], "value": "give advice a court would uphold", "category": "task",
             "question_styles": ["a question about a clause"]}
    entry.update(changes)
    return entry


def test_a_persona_is_added_by_a_domains_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"domains": {"law": _domain()}}))
    registry = PersonaRegistry.from_config(PersonaConfig(names=["law", "math"], granularity="min",
                                                         domains=str(path)))
    assert registry.names == ["law", "math"]
    assert registry["law"].text == "You are a lawyer." and registry["law"].topics == ("contracts", "torts")
    assert registry["math"].text == build_persona_text(DOMAINS["math"], "min")
    everything = PersonaRegistry.from_config(PersonaConfig(domains=str(path)))
    assert everything.names == [*DOMAINS, "law"]


@pytest.mark.parametrize("content,message", [
    ({"domains": {"law": _domain(role="")}}, r"mine.yaml: domains.law.role: expected a non-empty text"),
    ({"domains": {"law": {k: v for k, v in _domain().items() if k != "value"}}},
     r"mine.yaml: domains.law: missing value"),
    ({"domains": {"law": _domain(colour="red")}}, r"mine.yaml: domains.law: unknown colour"),
    ({"domains": {"law": _domain(pitfalls="one")}}, r"domains.law.pitfalls: expected a non-empty list"),
    ({"domains": {"math": _domain()}}, r"domain 'math' is a built-in persona"),
    ({"templates": {"min": "x"}, "domains": {"law": _domain()}}, r"`templates:` is shared"),
    ({"personas": {}}, r"mine.yaml: expected a mapping with a non-empty `domains:`"),
])
def test_a_bad_domains_file_names_the_file_and_entry(tmp_path, content, message):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(PrismError, match=message):
        PersonaRegistry.from_config(PersonaConfig(names=["law"], domains=str(path)))


def test_a_domains_file_with_a_yaml_error_names_its_line(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("domains:\n  law:\n    role: [unclosed\n")
    with pytest.raises(PrismError, match=r"data.personas.domains: .*mine.yaml:\d+: not valid YAML"):
        PersonaRegistry.from_config(PersonaConfig(names=["law"], domains=str(path)))
