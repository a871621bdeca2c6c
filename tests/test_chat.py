"""ChatFormatter on the real SmolLM2 tokenizer under four chat-template families."""

from __future__ import annotations

import copy

import pytest

from prism_lightning.contexts.domains import DOMAINS, build_persona_text
from prism_lightning.model.chat import ChatFormatter, EncodedExample

PERSONA = build_persona_text(DOMAINS["math"], "full")
QUERY = "How do I invert a 3x3 matrix by hand without making arithmetic slips?"
RESPONSE = "Compute the determinant first, then the matrix of cofactors, transpose it and divide by the determinant."
HISTORY = [("First earlier user turn about eigenvalues?", "First earlier assistant reply on eigenvalues."),
           ("Second earlier user turn about traces?", "Second earlier assistant reply on traces.")]

TEMPLATE_NAMES = ["chatml", "llama3", "mistral", "no_system"]
PLACEMENTS = [None, "system", "user"]  # None: no persona at all (the student prompt)


def _gen_ids(tok, info) -> list[int]:
    return tok(info.generation_prompt, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_supports_system_probe(template_tokenizers, template_info, name):
    formatter = ChatFormatter(template_tokenizers[name])
    assert formatter.supports_system is template_info[name].supports_system
    expected = "system" if template_info[name].supports_system else "user"
    assert formatter.effective_placement() == expected
    assert formatter.effective_placement("system") == expected
    assert formatter.effective_placement("user") == "user"


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_persona_placed_once_in_the_right_turn(template_tokenizers, template_info, name, placement):
    tok, info = template_tokenizers[name], template_info[name]
    persona = PERSONA if placement else None
    by_ctor = ChatFormatter(tok, placement or "system").prompt_text(QUERY, persona)
    by_call = ChatFormatter(tok, "user" if placement == "system" else "system").prompt_text(
        QUERY, persona, placement)
    assert by_ctor == by_call  # a per-call placement overrides the formatter's own
    prompt = by_ctor

    assert prompt.count(QUERY) == 1
    assert prompt.endswith(info.generation_prompt)
    if placement is None:
        assert PERSONA not in prompt
        assert info.user_block(QUERY) in prompt
    else:
        assert prompt.count(PERSONA) == 1
        in_system = placement == "system" and info.supports_system
        if in_system:
            assert info.system_block(PERSONA) in prompt
            assert info.user_block(QUERY) in prompt  # the user turn carries the query alone
            assert prompt.index(PERSONA) < prompt.index(QUERY)
        else:  # user placement, or the fallback for templates without a system role
            assert info.user_block(f"{PERSONA}\n\n{QUERY}") in prompt
            if info.system_block is not None:
                assert info.system_block(PERSONA) not in prompt
    if info.default_system is not None:
        # The template's default system prompt applies exactly when no persona sits in the system turn.
        replaced = placement == "system" and info.supports_system
        assert (info.default_system in prompt) is (not replaced)


@pytest.mark.parametrize("placement", ["system", "user"])
@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_prompt_ids_end_with_generation_prompt(template_tokenizers, template_info, name, placement):
    tok, info = template_tokenizers[name], template_info[name]
    formatter = ChatFormatter(tok, placement)
    gen = _gen_ids(tok, info)
    for persona in (None, PERSONA):
        ids = formatter.prompt_ids(QUERY, persona)
        assert ids[-len(gen):] == gen
        assert tok.decode(ids) == formatter.prompt_text(QUERY, persona)


@pytest.mark.parametrize("placement", ["system", "user"])
@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_encode_aligns_student_and_teacher(template_tokenizers, template_info, name, placement):
    tok, info = template_tokenizers[name], template_info[name]
    formatter = ChatFormatter(tok, placement)
    student = formatter.encode(QUERY, RESPONSE)
    teacher = formatter.encode(QUERY, RESPONSE, PERSONA)
    assert isinstance(student, EncodedExample)

    assert student.response_ids == teacher.response_ids
    plain = tok(RESPONSE, add_special_tokens=False)["input_ids"]
    assert teacher.response_ids == plain + [tok.eos_token_id]
    assert teacher.response_ids[-1] == tok.eos_token_id
    assert tok.decode(teacher.response_ids[:-1]) == RESPONSE

    gen = _gen_ids(tok, info)
    for example, persona in ((student, None), (teacher, PERSONA)):
        assert example.input_ids[:example.prompt_len] == formatter.prompt_ids(QUERY, persona)
        assert example.input_ids[example.prompt_len:] == example.response_ids
        assert example.feature_position == example.prompt_len - 1
        assert example.input_ids[example.feature_position] == gen[-1]
        assert example.input_ids[example.prompt_len - len(gen):example.prompt_len] == gen
    # The persona lengthens only the prompt; the response starts right after each prompt.
    assert teacher.prompt_len > student.prompt_len
    assert len(teacher.input_ids) - teacher.prompt_len == len(student.input_ids) - student.prompt_len


def test_encode_per_call_placement_matches_formatter_placement(template_tokenizers):
    tok = template_tokenizers["chatml"]
    per_call = ChatFormatter(tok, "system").encode(QUERY, RESPONSE, PERSONA, placement="user")
    by_ctor = ChatFormatter(tok, "user").encode(QUERY, RESPONSE, PERSONA)
    in_system = ChatFormatter(tok, "system").encode(QUERY, RESPONSE, PERSONA)
    assert per_call == by_ctor
    assert per_call.input_ids != in_system.input_ids
    assert per_call.response_ids == in_system.response_ids


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_history_turns_render_in_order(template_tokenizers, template_info, name, placement):
    tok, info = template_tokenizers[name], template_info[name]
    formatter = ChatFormatter(tok, placement or "system")
    persona = PERSONA if placement else None
    messages = formatter.messages(QUERY, persona, history=HISTORY)
    in_system = bool(persona) and placement == "system" and info.supports_system
    roles = [m["role"] for m in messages]
    assert roles == (["system"] if in_system else []) + ["user", "assistant"] * 2 + ["user"]
    assert messages[-1]["content"] == QUERY

    prompt = formatter.prompt_text(QUERY, persona, history=HISTORY)
    texts = [HISTORY[0][0], HISTORY[0][1], HISTORY[1][0], HISTORY[1][1], QUERY]
    positions = [prompt.index(t) for t in texts]
    assert all(prompt.count(t) == 1 for t in texts)
    assert positions == sorted(positions)
    assert prompt.endswith(info.generation_prompt)
    if persona:
        assert prompt.count(PERSONA) == 1
        assert prompt.index(PERSONA) < positions[0]  # the persona opens the conversation
        if not in_system:
            assert info.user_block(f"{PERSONA}\n\n{HISTORY[0][0]}") in prompt
            assert info.user_block(QUERY) in prompt
    else:
        assert PERSONA not in prompt
    # Without history the same call gives the single-turn prompt.
    assert formatter.prompt_text(QUERY, persona) != prompt
    assert formatter.prompt_text(QUERY, persona, history=()) == formatter.prompt_text(QUERY, persona)


@pytest.mark.parametrize("bad", ["assistant", "System", "", "both"])
def test_invalid_placement_raises(smol_tokenizer, bad):
    with pytest.raises(ValueError, match="placement"):
        ChatFormatter(smol_tokenizer, bad)


def test_invalid_per_call_placement_raises(smol_tokenizer):
    formatter = ChatFormatter(smol_tokenizer, "system")
    with pytest.raises(ValueError):
        formatter.prompt_text(QUERY, PERSONA, placement="assistant")


def test_tokenizer_without_chat_template_raises(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        ChatFormatter(tok)
