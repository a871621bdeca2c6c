"""Context kinds (persona, memory, tools, passages): registry, placement on two chat templates, stage-1 intents,
fixtures, probe files, and fidelity scoring on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from prism_lightning.bootstrap.config import QueryConfig
from prism_lightning.bootstrap.queries import candidate_intent, candidate_prompt, select_queries
from prism_lightning.contexts.fidelity import ROWS, Probe, load_probes, measure_fidelity, predicted_choices
from prism_lightning.contexts.fixtures import MEMORY_SLOTS, TOOLS, memory_fixture, tools_fixture, write_fixture
from prism_lightning.contexts.kinds import KINDS, render_block
from prism_lightning.contexts.personas import ContextSource, PersonaConfig, PersonaRegistry
from prism_lightning.model.chat import ChatFormatter
from prism_lightning.model.generation import continuation_logprob
from prism_lightning.training.datamodule import Collator
from prism_lightning.utils.errors import PrismError

QUERY = "Which floor is my flat on, and does the lift work?"


@pytest.fixture
def context_files(tmp_path):
    memory = write_fixture(memory_fixture(6, seed=3), tmp_path / "memory")[0]
    tools = write_fixture(tools_fixture(5, seed=3), tmp_path / "tools")[0]
    passages = tmp_path / "passages.txt"
    passages.write_text("The Rhine is 1,230 km long.\nIt flows into the North Sea.\n")
    return {"memory": memory, "tools": tools, "passages": passages}


def registry_of(files) -> PersonaRegistry:
    return PersonaRegistry.from_config(PersonaConfig(names=["math"], contexts=[
        ContextSource("memory", str(files["memory"]), "mem"), ContextSource("tools", str(files["tools"]), "reg"),
        ContextSource("passages", str(files["passages"]), "docs")]))


def test_registry_renders_each_kind_as_its_block(context_files):
    registry = registry_of(context_files)
    assert registry.names == ["math", "mem", "reg", "docs"]
    assert [registry[n].kind for n in registry.names] == ["persona", "memory", "tools", "passages"]
    mem, reg, docs = registry["mem"], registry["reg"], registry["docs"]
    assert mem.content == context_files["memory"].read_text().strip()
    assert mem.text == render_block("memory", mem.content) and mem.text.endswith(mem.content)
    assert mem.placement is None and reg.placement is None and docs.placement == "user"
    # The JSON registry becomes one compact schema per line inside the tool block.
    lines = reg.content.splitlines()
    assert len(lines) == 5 and all(json.loads(line)["name"] for line in lines)
    assert reg.text.startswith("You can call the tools below") and "<tools>\n" + lines[0] in reg.text
    assert "<passages>\nThe Rhine is 1,230 km long." in docs.text


@pytest.mark.parametrize("name", ["chatml", "mistral"])  # a template with a system role, and one that rejects it
def test_kinds_are_placed_as_they_are_given(template_tokenizers, template_info, context_files, name):
    tok, info = template_tokenizers[name], template_info[name]
    registry = registry_of(context_files)
    formatter = ChatFormatter(tok, "system")
    for context in ("mem", "reg"):
        block = registry[context].text
        prompt = formatter.prompt_text(QUERY, block, registry[context].placement)
        assert prompt.count(block) == 1
        if info.supports_system:
            assert info.system_block(block) in prompt and info.user_block(QUERY) in prompt
        else:
            assert info.user_block(f"{block}\n\n{QUERY}") in prompt
    docs = registry["docs"]  # retrieved passages sit in the user turn, whatever data.placement says
    prompt = formatter.prompt_text(QUERY, docs.text, docs.placement)
    assert info.user_block(f"{docs.text}\n\n{QUERY}") in prompt
    if info.system_block is not None:
        assert info.system_block(docs.text) not in prompt


def test_collator_places_a_passages_teacher_in_the_user_turn(smol_tokenizer, context_files):
    registry = registry_of(context_files)
    formatter = ChatFormatter(smol_tokenizer, "system")
    item = {"id": "docs-0000", "label": 1, "query": QUERY, "persona_answer": "It is 1,230 km.",
            "baseline_answer": "-", "target_persona": "docs"}
    texts = {p.name: p.text for p in registry}
    placed = Collator(formatter, texts, 1024, placements={"docs": "user"}).encode_item(item)
    default = Collator(formatter, texts, 1024).encode_item(item)
    expected = formatter.encode(QUERY, "It is 1,230 km.", texts["docs"], "user").input_ids
    assert placed["teacher"] == expected and default["teacher"] != expected
    assert placed["student"] == default["student"]
    # The shared prefix the online teacher reuses ends before the query, in the user turn.
    prefix = formatter.context_prefix(texts["docs"], "user")
    assert placed["t_prefix"] == len(prefix) and expected[:len(prefix)] == prefix
    assert len(prefix) > len(formatter.context_prefix(None)) + 20  # the passages block is in it


def test_contexts_from_a_directory_take_their_file_names(tmp_path):
    folder = tmp_path / "memories"
    folder.mkdir()
    (folder / "alice.txt").write_text("- Alice keeps bees.")
    (folder / "bob.md").write_text("- Bob rows.")
    (folder / "notes.bin").write_text("ignored")
    registry = PersonaRegistry.from_config(PersonaConfig(names=[], contexts=[ContextSource("memory", str(folder))]))
    assert registry.names == ["alice", "bob"]


@pytest.mark.parametrize("content", ["", "  \n\n "])
def test_empty_context_file_is_one_line_naming_key_and_file(tmp_path, content):
    empty = tmp_path / "empty.txt"
    empty.write_text(content)
    with pytest.raises(PrismError) as info:
        PersonaRegistry.from_config(PersonaConfig(names=[], contexts=[ContextSource("memory", str(empty))]))
    message = str(info.value)
    assert "data.personas.contexts[0].path" in message and "empty" in message and str(empty) in message
    assert "\n" not in message


def test_two_contexts_with_one_name_are_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        (folder / "shared.txt").write_text("- some fact")
    with pytest.raises(PrismError, match="two contexts are named 'shared'"):
        PersonaRegistry.from_config(PersonaConfig(names=[], contexts=[ContextSource("memory", str(a)),
                                                                       ContextSource("passages", str(b))]))
    with pytest.raises(PrismError, match="two contexts are named 'x'"):
        PersonaRegistry.from_config(PersonaConfig(names=[], files={"x": str(a / "shared.txt")},
                                                  contexts=[ContextSource("tools", str(b / "shared.txt"), "x")]))


@pytest.mark.parametrize("source, match", [
    (ContextSource("diary", "x.txt"), r"contexts\[0\]\.kind: unknown context kind 'diary'"),
    (ContextSource("memory", "missing.txt"), r"contexts\[0\]\.path: context file not found"),
    (ContextSource("memory", "DIR", "named"), r"contexts\[0\]\.name: a directory gives one context per file"),
    (ContextSource("memory", "FILE", "math"), r"'math' is a built-in persona"),
])
def test_bad_context_sources(tmp_path, source, match):
    (tmp_path / "f.txt").write_text("- a fact")
    path = {"DIR": str(tmp_path), "FILE": str(tmp_path / "f.txt")}.get(source.path, str(tmp_path / source.path))
    with pytest.raises(PrismError, match=match):
        PersonaRegistry.from_config(PersonaConfig(names=[], contexts=[ContextSource(source.kind, path,
                                                                                    source.name)]))


def test_bad_tool_json_names_file_and_line(tmp_path):
    bad = tmp_path / "tools.json"
    bad.write_text('[\n {"name": "a"},\n {"name": }\n]')
    with pytest.raises(PrismError, match=r"tools.json:3: not valid JSON"):
        PersonaRegistry.from_config(PersonaConfig(names=[], contexts=[ContextSource("tools", str(bad))]))
    bad.write_text('[{"description": "no name"}]')
    with pytest.raises(PrismError, match='tool 0 has no "name"'):
        PersonaRegistry.from_config(PersonaConfig(names=[], contexts=[ContextSource("tools", str(bad))]))


def test_context_kinds_ask_inside_and_outside_questions(context_files):
    registry = registry_of(context_files)
    persona = registry["math"]
    assert {candidate_intent(persona, i) for i in range(12)} == {"inside"}  # a persona's questions are all its own
    for name in ("mem", "reg", "docs"):
        context = registry[name]
        intents = [candidate_intent(context, i) for i in range(12)]
        assert intents == (["inside", "inside", "outside"] * 4)
        prompts = [candidate_prompt(context, i) for i in range(12)]
        assert all(context.content in p for p, t in zip(prompts, intents) if t == "inside")
        assert not any(context.content in p for p, t in zip(prompts, intents) if t == "outside")
        assert len(set(prompts)) > 6


def test_selected_context_queries_record_their_intent(context_files):
    registry = registry_of(context_files)
    raw = [{"persona": "mem", "index": i, "text": f"Question number {i} about my own life and plans?"}
           for i in range(6)]
    raw += [{"persona": "math", "index": 0, "text": "How do I integrate x squared from zero to one?"}]
    selected = select_queries(raw, registry, QueryConfig(per_persona=6, near_duplicate=0.95))
    mem = [q for q in selected if q["persona"] == "mem"]
    assert [q["intent"] for q in mem] == ["inside", "inside", "outside"] * 2
    assert all("intent" not in q for q in selected if q["persona"] == "math")


def test_fixtures_are_deterministic_and_checkable(tmp_path):
    memory = memory_fixture(12, seed=1)
    assert memory == memory_fixture(12, seed=1) and memory != memory_fixture(12, seed=2)
    facts = memory.text.splitlines()
    probes = [p for p in memory.probes if p["kind"] == "probe"]
    assert len(facts) == len(probes) == 12
    for fact, probe in zip(facts, probes):
        slot = next(s for s in MEMORY_SLOTS if s[1] == probe["question"])
        value = slot[3][probe["answer"]]
        assert fact == "- " + slot[0].format(v=value)  # the right choice is the value in the memory
        assert probe["choices"][probe["answer"]] == slot[2].format(v=value)
    tools = tools_fixture(8, seed=1)
    schema = json.loads(tools.text)
    probes = [p for p in tools.probes if p["kind"] == "probe"]
    for tool, probe in zip(schema, probes):
        assert f'"{tool["name"]}"' in probe["choices"][probe["answer"]]
        assert probe["question"] == next(t[3] for t in TOOLS if t[0] == tool["name"])
    paths = write_fixture(tools, tmp_path)
    assert [p.name for p in paths] == ["tools.json", "probes.jsonl"]
    assert len(load_probes(paths[1])) == len(tools.probes)


@pytest.mark.parametrize("line, match", [
    ('{"question": "", "choices": ["a", "b"], "answer": 0}', 'non-empty string "question"'),
    ('{"question": "q", "choices": ["a"], "answer": 0}', "two or more string"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 2}', r'"answer" must index "choices" \(0..1\)'),
    ('{"question": "q", "kind": "quiz", "choices": ["a", "b"], "answer": 0}', "two or more string"),
])
def test_bad_probe_rows_name_file_and_line(tmp_path, line, match):
    path = tmp_path / "probes.jsonl"
    path.write_text('{"question": "ok?", "choices": ["a", "b"], "answer": 1}\n\n' + line + "\n")
    with pytest.raises(PrismError, match=rf"probes.jsonl:3: .*{match}"):
        load_probes(path)


def test_probe_file_without_probes_is_refused(tmp_path):
    path = tmp_path / "probes.jsonl"
    path.write_text('{"question": "Why is the sky blue?", "kind": "unrelated"}\n')
    with pytest.raises(PrismError, match="no rows of kind"):
        load_probes(path)


def gated_model(backbone, threshold: float):
    """A GatedModel on the tiny backbone: random LoRA (B non-zero) and an untrained gate; ``threshold`` 0 opens the
    gate on every prompt, above 1 on none."""
    from peft import LoraConfig, get_peft_model

    from prism_lightning.inference.gated_model import GatedModel
    from prism_lightning.model.gate_mlp import GateMLP

    torch.manual_seed(0)
    model = get_peft_model(backbone.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False), adapter_name="prism")
    return GatedModel(backbone, model.eval(), GateMLP(backbone.model.config.hidden_size).eval(), threshold, 1.0,
                      adapters=["prism"])


def test_fidelity_rows_and_routing_on_a_tiny_model(tiny_backbone):
    fixture = memory_fixture(4, seed=0)
    probes = [Probe(p["question"], p["kind"], tuple(p.get("choices", ())), p.get("answer", -1))
              for p in fixture.probes[:8]]
    context = render_block("memory", fixture.text)
    gated = gated_model(tiny_backbone, threshold=0.0)
    opened = measure_fidelity(gated, context, probes, batch_size=5)
    assert list(opened["rows"]) == list(ROWS)
    assert opened["n_probes"] == 4 and opened["chance"] == pytest.approx(1 / 6)
    assert opened["routing"]["probe"]["rate"] == 1.0 and opened["routing"]["unrelated"]["n"] == 4
    # PRISM is the adapter row when the gate opens everywhere and the base row when it never does.
    assert opened["rows"]["PRISM, no context"] == opened["rows"]["Adapter always on, no context"]
    gated.threshold = 1.01
    closed = measure_fidelity(gated, context, probes, batch_size=5)
    assert closed["rows"]["PRISM, no context"] == closed["rows"]["Base, no context"]
    assert closed["routing"]["probe"]["rate"] == 0.0
    assert opened["context_tokens"] > 30


def test_predicted_choice_is_the_argmax_of_each_choice_likelihood(tiny_backbone):
    gated = gated_model(tiny_backbone, threshold=0.0)
    probes = [Probe("What is my dog called?", "probe", ("Your dog is called Rex.", "Your dog is called Bo.",
                                                        "It is Max."), 0),
              Probe("Which city?", "probe", ("Lisbon", "Oslo"), 1)]
    prompts = [gated.formatter.prompt_ids(p.question) for p in probes]
    tok = tiny_backbone.tokenizer
    for use in ([False, False], [True, False], [True, True]):
        picks = predicted_choices(gated, prompts, probes, ["prism" if u else "__base__" for u in use], batch_size=2)
        for probe, prompt, on, pick in zip(probes, prompts, use, picks):
            scores = []
            for choice in probe.choices:  # one pair per forward, adapter toggled as a whole
                ids = tok(choice, add_special_tokens=False)["input_ids"]
                if on:
                    scores.append(continuation_logprob(gated.model, tok.pad_token_id, "cpu", [prompt], [ids]))
                else:
                    with gated.model.disable_adapter():
                        scores.append(continuation_logprob(gated.model, tok.pad_token_id, "cpu", [prompt], [ids]))
            assert pick == int(torch.argmax(torch.cat(scores)))


def test_every_kind_has_frames_for_both_intents():
    for kind, spec in KINDS.items():
        assert spec.inside_frames and all("{context}" in f for f in spec.inside_frames)
        if kind != "persona":
            assert spec.outside_every >= 2 and spec.outside_frames and spec.question_styles
            assert all("{context}" not in f for f in spec.outside_frames)


@pytest.mark.parametrize("kind", ["memory", "tools"])
def test_the_committed_fixtures_are_what_the_documented_command_writes(tmp_path, kind):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "prism_lightning.contexts.fixtures", kind, "--n", "12", "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=root)
    assert result.returncode == 0, result.stderr
    for written in tmp_path.iterdir():
        assert written.read_bytes() == (root / "configs" / "contexts" / kind / written.name).read_bytes()
