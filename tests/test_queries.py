"""Stage 1 text handling: parsing generations, deduplication, prompt variety and query selection."""

from __future__ import annotations

import pytest

from prism_lightning.bootstrap.config import QueryConfig
from prism_lightning.bootstrap.queries import candidate_prompt, dedup, parse_query, select_queries
from prism_lightning.contexts.personas import PersonaConfig, PersonaRegistry

CONFIG = QueryConfig(min_chars=20, max_chars=120, min_words=4, near_duplicate=0.7, per_persona=3)
Q = "How do I reverse a singly linked list in place?"


@pytest.mark.parametrize("text", [
    Q,
    f"Question 3: {Q}",
    f"question #12 - {Q}",
    f"1. {Q}",
    f"2) {Q}",
    f"Q: {Q}",
    f"Query: {Q}",
    f"User's question: {Q}",
    f"- {Q}",
    f"* {Q}",
    f"• {Q}",
    f'"{Q}"',
    f"“{Q}”",
    f"'{Q}'",
    f'Question 3: "{Q}"',
    f"   {Q}   \n",
    f"Sure! Here is a question:\n{Q}",
    f"Sure! Here is a question:\n\n{Q}",
    f"Here's one realistic question a user might ask:\n\n1. {Q}",
    f"Okay.\n\nQuestion:\n\n{Q}\n\nThis tests knowledge of pointers.",
])
def test_parse_query_strips_wrappers(text):
    assert parse_query(text, CONFIG) == Q


def test_parse_query_joins_a_multiline_first_paragraph_and_ignores_later_ones():
    text = ("Sure, here is the question:\n"
            "I have a list of ten million integers\n"
            "and need the median without sorting it all.\n"
            "What is the fastest way?\n\n"
            "Note: this question tests selection algorithms.")
    assert parse_query(text, CONFIG) == ("I have a list of ten million integers and need the median without "
                                         "sorting it all. What is the fastest way?")


def test_parse_query_collapses_whitespace():
    assert parse_query("How do   I reverse\ta singly   linked list in place?", CONFIG) == Q


@pytest.mark.parametrize("text", [
    "",
    "   \n\n  ",
    "Sure! Here is a question:",                       # preamble only
    "Why is the sky blue",                             # 4 words but under min_chars (19 chars)
    "Question 1: Explain recursion?",                  # 2 words, 19 characters once stripped
    "Supercalifragilistic antidisestablishmentarianism?",  # long enough, too few words
    "How " + "really " * 30 + "do I do this?",        # over max_chars
])
def test_parse_query_rejects(text):
    assert parse_query(text, CONFIG) is None


def test_parse_query_length_bounds_follow_config():
    text = "Why does my loop never stop running?"  # 36 characters, 7 words
    assert parse_query(text, QueryConfig(min_chars=36, max_chars=36, min_words=7)) == text
    assert parse_query(text, QueryConfig(min_chars=37, max_chars=400, min_words=4)) is None
    assert parse_query(text, QueryConfig(min_chars=10, max_chars=35, min_words=4)) is None
    assert parse_query(text, QueryConfig(min_chars=10, max_chars=400, min_words=8)) is None


def test_parse_query_strips_markdown_bold_label():
    assert parse_query(f"**Question:** {Q}", CONFIG) == Q


def test_parse_query_keeps_a_leading_decimal_number():
    text = "3.5 million people ride the metro daily; how many trains are needed?"
    assert parse_query(text, QueryConfig()) == text


# ----------------------------------------------------------------------------------------- dedup
def test_dedup_removes_case_and_punctuation_variants():
    queries = [Q, "how do i reverse a singly linked list in place", "HOW DO I REVERSE A SINGLY LINKED LIST, IN PLACE?!"]
    assert dedup(queries, 0.7) == [Q]


def test_dedup_near_duplicates_depend_on_threshold():
    a = "how do i reverse a singly linked list in place"        # 10 words
    b = "how do i reverse a singly linked list in python"       # 9 shared, union 11 -> 0.818
    assert dedup([a, b], 0.8) == [a]
    assert dedup([a, b], 0.82) == [a, b]
    assert dedup([a, b], 9 / 11) == [a]  # the threshold itself counts as a duplicate


def test_dedup_keeps_distinct_queries_in_order():
    queries = ["What is a monad in functional programming?", "How should I season a cast iron pan?",
               "Why do stars twinkle at night but planets do not?", "What is a monad in functional programming?"]
    assert dedup(queries, 0.7) == queries[:3]


def test_dedup_shared_seen_list_spans_calls():
    seen: list = []
    first = dedup(["What is a monad in functional programming?", "How should I season a cast iron pan?"], 0.7, seen)
    assert len(first) == 2 and len(seen) == 2
    second = dedup(["what is a MONAD in functional programming", "Why do stars twinkle at night?"], 0.7, seen)
    assert second == ["Why do stars twinkle at night?"]
    assert len(seen) == 3
    # Without the shared list the same call keeps both.
    assert len(dedup(["what is a MONAD in functional programming", "Why do stars twinkle at night?"], 0.7)) == 2


# ----------------------------------------------------------------------------------- prompts
@pytest.fixture(scope="module")
def registry():
    return PersonaRegistry.from_config(PersonaConfig(names=["coding", "math", "writing"], granularity="half"))


@pytest.mark.parametrize("name", ["coding", "math", "writing"])
def test_candidate_prompt_varies_with_index(registry, name):
    persona = registry[name]
    prompts = [candidate_prompt(persona, i) for i in range(12)]
    assert len(set(prompts)) >= 8
    assert all(persona.text in p for p in prompts)
    assert candidate_prompt(persona, 5) == prompts[5]  # deterministic
    assert any(topic in " ".join(prompts) for topic in persona.topics)
    assert any(style in " ".join(prompts) for style in persona.question_styles)


def test_candidate_prompt_for_a_file_context(tmp_path):
    ctx = tmp_path / "tools.txt"
    ctx.write_text("You can call the tools search(query) and calculator(expression).\n")
    persona = PersonaRegistry.from_config(PersonaConfig(names=["math"], files={"tools": str(ctx)}))["tools"]
    prompts = [candidate_prompt(persona, i) for i in range(12)]
    assert len(set(prompts)) >= 8
    assert all(persona.text in p for p in prompts)


def test_candidate_prompt_differs_between_personas(registry):
    assert candidate_prompt(registry["coding"], 0) != candidate_prompt(registry["math"], 0)


# --------------------------------------------------------------------------------- selection
def _raw(persona: str, texts: list[str]) -> list[dict]:
    return [{"id": f"{persona}/{i}", "persona": persona, "index": i, "text": t} for i, t in enumerate(texts)]


def test_select_queries_caps_dedups_and_ids(registry):
    coding = ["How do I reverse a singly linked list in place?",
              "1. Why does my Python generator stop after one pass?",
              "ok",                                                     # unparseable
              "How do I reverse a singly linked list in place!",        # duplicate
              "What is the cleanest way to mock time in unit tests?",
              "How can I profile a slow SQL query in Postgres?"]        # beyond the cap of 3
    math = ["Q: How do I reverse a singly linked list in place?",       # cross-persona duplicate
            "How do I prove that the square root of two is irrational?",
            "What is the derivative of x to the power x?"]
    writing = ["Sure! Here is a question:\n\nHow can I make my opening paragraph hook readers faster?"]
    # Raw rows arrive in any order: selection follows each persona's generation index.
    raw = list(reversed(_raw("coding", coding))) + _raw("writing", writing) + _raw("math", math)
    selected = select_queries(raw, registry, CONFIG)

    by_persona = {}
    for row in selected:
        by_persona.setdefault(row["persona"], []).append(row["query"])
    assert by_persona["coding"] == ["How do I reverse a singly linked list in place?",
                                    "Why does my Python generator stop after one pass?",
                                    "What is the cleanest way to mock time in unit tests?"]
    assert by_persona["math"] == ["How do I prove that the square root of two is irrational?",
                                  "What is the derivative of x to the power x?"]
    assert by_persona["writing"] == ["How can I make my opening paragraph hook readers faster?"]
    assert [r["persona"] for r in selected] == ["coding"] * 3 + ["math"] * 2 + ["writing"]  # registry order

    ids = [r["id"] for r in selected]
    assert len(ids) == len(set(ids))
    assert ids[:3] == ["coding-0000", "coding-0001", "coding-0002"]
    assert all(r["id"].startswith(r["persona"] + "-") for r in selected)


def test_select_queries_cap_applies_per_persona(registry):
    texts = [f"How do I handle edge case number {w} in my parser?" for w in
             ("one", "two", "three", "four", "five")]
    math_texts = [f"Why is the integral of {f} what it is?" for f in ("sine", "cosine", "tangent", "secant")]
    config = QueryConfig(min_chars=20, max_chars=200, min_words=4, near_duplicate=0.95, per_persona=2)
    selected = select_queries(_raw("coding", texts) + _raw("math", math_texts), registry, config)
    counts = {name: sum(r["persona"] == name for r in selected) for name in registry.names}
    assert counts == {"coding": 2, "math": 2, "writing": 0}
    assert len({r["query"] for r in selected}) == 4
