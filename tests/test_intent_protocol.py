"""The ``intent`` protocol: knowledge questions from stage 1, labels by construction or by a scorer, cache keys."""

from __future__ import annotations

import json

import pytest

from prism_lightning.bootstrap.config import AnswerConfig, JudgeConfig, LabelConfig, QueryConfig
from prism_lightning.bootstrap.corpus import CorpusBuilder
from prism_lightning.bootstrap.intent import CONSTRUCTION, constructed_label, sources_text
from prism_lightning.bootstrap.queries import candidate_intent, candidate_prompt
from prism_lightning.bootstrap.reliability import reliability_text
from prism_lightning.contexts.kinds import KINDS, candidate_frame
from prism_lightning.contexts.personas import PersonaConfig, PersonaRegistry
from prism_lightning.model.generation import DecodingConfig
from prism_lightning.utils.jsonl import read_jsonl


def test_knowledge_frames_alternate_and_mix_the_domain_with_general_topics():
    math = PersonaRegistry.from_config(PersonaConfig(names=["math"], granularity="min"))["math"]
    assert {candidate_intent(math, i) for i in range(12)} == {"inside"}  # the paper's stage 1: no knowledge ones
    intents = [candidate_intent(math, i, knowledge_every=2) for i in range(12)]
    assert intents == ["inside", "outside"] * 6
    outside = [candidate_prompt(math, i, knowledge_every=2) for i in range(1, 12, 2)]
    starts = [frame.split("{topic}")[0] for frame in KINDS["persona"].outside_frames]
    assert all(any(p.startswith(start) for start in starts) for p in outside)
    in_domain = [p for p in outside if any(t in p for t in math.topics)]
    assert 0 < len(in_domain) < len(outside)  # some in the persona's own topics, some general
    assert all(math.source_text not in p for p in outside)  # a knowledge question does not show the persona
    # A context keeps its own cadence of outside questions whatever knowledge_every says.
    memory = [candidate_frame("memory", i, (), (), knowledge_every=2)[1] for i in range(6)]
    assert memory == ["inside", "inside", "outside"] * 2


def test_construction_labels_never_make_a_knowledge_question_distill():
    none, scored = JudgeConfig(protocol="intent"), JudgeConfig(protocol="intent", intent_scorer="likelihood")
    assert none.scoring is None and scored.scoring == "likelihood" and scored.scored().protocol == "likelihood"
    assert constructed_label({"intent": "outside"}, none) == 0 == constructed_label({"intent": "outside"}, scored)
    assert constructed_label({"intent": "inside"}, none) == 1
    assert constructed_label({"intent": "inside"}, scored) is None  # the scorer decides
    assert constructed_label({"intent": "outside"}, JudgeConfig(protocol="likelihood")) is None  # only under intent


def _builder(base, directory, scorer: str = "none", protocol: str = "intent") -> CorpusBuilder:
    return CorpusBuilder(base.config, PersonaConfig(names=["math", "writing"], granularity="min"),
                         QueryConfig(per_persona=4, max_rounds=1, oversample=2, min_chars=1, min_words=1,
                                     near_duplicate=1.0,
                                     decoding=DecodingConfig(temperature=0.9, max_new_tokens=12, batch_size=4)),
                         AnswerConfig(decoding=DecodingConfig(temperature=0.7, max_new_tokens=8, batch_size=2)),
                         JudgeConfig(protocol=protocol, intent_scorer=scorer, control_pairs=2, batch_size=4,
                                     max_answer_tokens=8),
                         "system", directory, LabelConfig())


def test_intent_without_a_scorer_judges_nothing_and_labels_by_construction(tiny_backbones, tmp_path):
    corpus = _builder(tiny_backbones(seed=0), tmp_path / "corpus").build()
    intents = {i["intent"] for i in corpus.items}
    assert intents == {"inside", "outside"}  # both label sources present
    for item in corpus.items:
        assert item["label_source"] == CONSTRUCTION
        assert item["label"] == (1 if item["intent"] == "inside" else 0), item
        assert item["win_prob"] == item["label"] and item["persona_answer"] and item["baseline_answer"]
    assert not list((tmp_path / "corpus" / "stages").glob("judge-*"))  # no judge stage at all
    m = corpus.manifest
    assert "judge" not in m["stages"] and m["judge"]["protocol"] == "intent"
    assert m["judge"]["intent_scorer"] == "none" and m["judge"]["control_n"] == 0
    sources = m["labels"]["label_sources"]
    assert set(sources) == {CONSTRUCTION} and sources[CONSTRUCTION]["items"] == len(corpus.items)
    assert sources[CONSTRUCTION]["retain"] == sum(i["intent"] == "outside" for i in corpus.items)
    text = reliability_text(m["labels"])
    assert "by construction" in text and "not a measurement" in text and "not measured" in text


def test_a_scorer_labels_only_the_persona_domain_queries_and_keys_its_own_stage(tiny_backbones, tmp_path):
    base = tiny_backbones(seed=0)
    scored = _builder(base, tmp_path / "corpus", "likelihood").build()
    outside = [i for i in scored.items if i["intent"] == "outside"]
    inside = [i for i in scored.items if i["intent"] == "inside"]
    assert outside and inside
    assert all(i["label"] == 0 and i["label_source"] == CONSTRUCTION for i in outside)
    assert all(i["label_source"] == "likelihood" for i in inside)
    judged = read_jsonl(tmp_path / "corpus" / "stages" / f"judge-{scored.manifest['stages']['judge']}.jsonl")
    judged_queries = {r["id"].split("/")[1] for r in judged if r["id"].startswith("lik/") and "/__base__" not in
                      r["id"] and not r["id"].startswith(("lik/control", "lik/quality", "lik/cross"))}
    assert judged_queries and judged_queries <= {i["id"] for i in inside}  # no knowledge question judged
    assert set(scored.manifest["labels"]["label_sources"]) == {CONSTRUCTION, "likelihood"}
    # The scorer is part of the judge stage's key; stages 1-2 are shared by every scorer.
    pointwise = _builder(base, tmp_path / "corpus", "pointwise").build()
    assert pointwise.manifest["stages"]["queries"] == scored.manifest["stages"]["queries"]
    assert pointwise.manifest["stages"]["answers"] == scored.manifest["stages"]["answers"]
    assert pointwise.manifest["stages"]["judge"] != scored.manifest["stages"]["judge"]
    # Another protocol writes no knowledge question: a stage 1 of its own, and no intent on any item.
    plain = _builder(base, tmp_path / "plain", protocol="likelihood").build()
    assert plain.manifest["stages"]["queries"] != scored.manifest["stages"]["queries"]
    assert all("intent" not in i and i["label_source"] == "likelihood" for i in plain.items)


def test_a_bootstrap_killed_mid_stage_resumes_to_the_same_corpus(tiny_backbones, tmp_path):
    base = tiny_backbones(seed=0)
    first = _builder(base, tmp_path / "corpus").build()
    stages = tmp_path / "corpus" / "stages"
    answers = stages / f"answers-{first.manifest['stages']['answers']}.jsonl"
    lines = answers.read_text().splitlines()
    # What a SIGKILL in stage 2 leaves: the first half of the records and a torn last line.
    answers.write_text("\n".join(lines[:len(lines) // 2]) + "\n" + lines[len(lines) // 2][:20])
    (tmp_path / "corpus" / "corpus.jsonl").unlink()
    again = _builder(base, tmp_path / "corpus").build()
    assert again.items == first.items
    ids = [json.loads(line)["id"] for line in answers.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == len(lines)


def test_sources_text_says_what_is_a_prior_and_what_was_measured():
    text = sources_text({CONSTRUCTION: {"items": 10, "distill": 0, "retain": 10},
                         "likelihood": {"items": 8, "distill": 3, "retain": 5}})
    assert "10 by construction (10 questions the persona does not help with -> retain" in text
    assert "8 measured by the likelihood protocol (3 distill, 5 retain)" in text
    assert sources_text({"judge": {"items": 3, "distill": 1, "retain": 2}}) == ""  # a corpus from before


def test_knowledge_every_one_under_intent_is_one_line():
    from prism_lightning.training.datamodule import BootstrapDataModule
    from prism_lightning.utils.errors import PrismError

    with pytest.raises(PrismError, match="data.queries.knowledge_every"):
        BootstrapDataModule(queries=QueryConfig(knowledge_every=1), judge=JudgeConfig(protocol="intent"))
