"""Gate labels, judge statistics and control accuracy from hand-built judge scores."""

from __future__ import annotations

import math

import pytest

from prism_lightning.bootstrap.answers import BASELINE
from prism_lightning.bootstrap.config import JudgeConfig
from prism_lightning.bootstrap.judge import POINTWISE
from prism_lightning.bootstrap.labels import control_accuracy, control_pairs, label_queries
from prism_lightning.utils.stats import wilson_interval

# (first, second) log-probs over (A, B, TIE); first order shows (baseline, candidate), second (candidate, baseline).
WIN = ([-3.0, -0.1, -4.0], [-0.1, -3.0, -4.0])            # candidate wins both, margin +2.9
LOSE = ([-0.1, -3.0, -4.0], [-3.0, -0.1, -4.0])           # baseline wins both, margin -2.9
BIASED_UP = ([-0.1, -2.8, -4.0], [-0.1, -3.0, -4.0])      # always "A", content nudge +0.1 for the candidate
BIASED_DOWN = ([-0.1, -3.2, -4.0], [-0.1, -3.0, -4.0])    # always "A", content nudge -0.1
TIE_BOTH = ([-3.0, -2.0, -0.1], [-3.0, -2.0, -0.1])       # TIE in both orders, margin 0


def pair(scores) -> dict:
    first, second = scores
    return {"first": list(first), "second": list(second)}


def point(grade: int, total: float = 1.0, share: float = 0.99) -> dict:
    """Pointwise record: log P(grade g is the answer), ``total`` on the grades 1-9 and 10 (near 0 unless it is the
    ``grade``), ``share`` of it on ``grade`` (1-10)."""
    probs = [total * (1.0 - share) / 9] * 9 + [1e-9]
    if grade == 10:
        probs[9] = total * share
    else:
        probs[grade - 1] += total * share
    return {"grades": [math.log(p) for p in probs]}


QUERIES = [
    {"id": "coding-0000", "persona": "coding", "query": "How do I reverse a linked list?"},
    {"id": "coding-0001", "persona": "coding", "query": "Why is my regex so slow?"},
    {"id": "math-0000", "persona": "math", "query": "Is every prime above 2 odd?"},
    {"id": "math-0001", "persona": "math", "query": "What is a group homomorphism?"},
]
NAMES = ["coding", "math", "writing"]


def answers_for(queries=QUERIES, names=NAMES) -> dict:
    return {q["id"]: {BASELINE: f"base answer to {q['id']}", **{n: f"{n} answer to {q['id']}" for n in names}}
            for q in queries}


MATCHED = {q["id"]: [q["persona"]] for q in QUERIES}
MATCHED_SCORES = {
    "coding-0000/coding": pair(WIN),
    "coding-0001/coding": pair(LOSE),
    "math-0000/math": pair(BIASED_UP),
    "math-0001/math": pair(TIE_BOTH),
}


def test_label_queries_matched_debiased():
    items, stats = label_queries(QUERIES, MATCHED, answers_for(), MATCHED_SCORES, JudgeConfig(protocol="debiased"))
    assert [i["id"] for i in items] == [q["id"] for q in QUERIES]
    assert [i["label"] for i in items] == [1, 0, 1, 0]
    assert [i["margin"] for i in items] == pytest.approx([2.9, -2.9, 0.1, 0.0], abs=1e-4)
    for item, query in zip(items, QUERIES):
        assert item["persona"] == query["persona"] and item["query"] == query["query"]
        assert item["target_persona"] == query["persona"]
        assert item["baseline_answer"] == f"base answer to {query['id']}"
        assert item["persona_answer"] == f"{query['persona']} answer to {query['id']}"
        assert isinstance(item["label"], int)
    assert stats["position_bias_rate"] == pytest.approx(0.25)      # only the always-"A" pair
    assert stats["tie_rate"] == pytest.approx(2 / 8)                # two of eight orders said TIE
    assert stats["persona_wins_both_rate"] == pytest.approx(0.25)
    assert stats["unparseable"] == 0


def test_label_queries_matched_strict_rejects_position_bias():
    items, _ = label_queries(QUERIES, MATCHED, answers_for(), MATCHED_SCORES, JudgeConfig(protocol="strict"))
    assert [i["label"] for i in items] == [1, 0, 0, 0]


def test_label_queries_margin_and_unparseable():
    scores = dict(MATCHED_SCORES)
    scores["coding-0000/coding"] = pair(([-6.0, -4.0, -7.0], [-4.0, -6.0, -7.0]))  # wins, but ~2 % mass
    config = JudgeConfig(protocol="debiased", margin=0.05, min_choice_mass=0.5)
    items, stats = label_queries(QUERIES, MATCHED, answers_for(), scores, config)
    assert [i["label"] for i in items] == [0, 0, 1, 0]
    assert stats["unparseable"] == 1
    # With no mass floor the low-mass win counts; a margin of 0.2 drops the +0.1 position-biased pair.
    config = JudgeConfig(protocol="debiased", margin=0.2, min_choice_mass=0.0)
    items, stats = label_queries(QUERIES, MATCHED, answers_for(), scores, config)
    assert [i["label"] for i in items] == [1, 0, 0, 0]
    assert stats["unparseable"] == 0


def _best_of_k_scores(qid: str, per_name: dict) -> dict:
    return {f"{qid}/{name}": pair(s) for name, s in per_name.items()}


def test_best_of_k_picks_the_highest_margin_winner():
    queries = QUERIES[:3]
    candidates = {q["id"]: NAMES for q in queries}
    small_win = ([-2.0, -1.0, -4.0], [-1.0, -2.0, -4.0])     # margin +1.0, wins both
    big_win = ([-2.5, -0.2, -4.0], [-0.2, -2.5, -4.0])       # margin +2.3, wins both
    # Larger mean margin (+2.8) without winning the first order: only debiased counts it as a win.
    biased_big = ([-0.1, -0.5, -4.0], [-0.01, -6.0, -7.0])
    scores = {}
    scores.update(_best_of_k_scores("coding-0000", {"coding": small_win, "math": big_win, "writing": LOSE}))
    scores.update(_best_of_k_scores("coding-0001", {"coding": LOSE, "math": BIASED_DOWN, "writing": LOSE}))
    scores.update(_best_of_k_scores("math-0000", {"coding": small_win, "math": biased_big, "writing": LOSE}))

    strict, _ = label_queries(queries, candidates, answers_for(), scores, JudgeConfig(protocol="strict"))
    assert [(i["label"], i["target_persona"]) for i in strict] == [(1, "math"), (0, "math"), (1, "coding")]
    assert [i["margin"] for i in strict] == pytest.approx([2.3, -0.1, 1.0], abs=1e-4)
    assert strict[0]["persona_answer"] == "math answer to coding-0000"
    assert strict[2]["persona_answer"] == "coding answer to math-0000"
    assert strict[0]["persona"] == "coding"  # the query's own persona is kept apart from the target

    debiased, stats = label_queries(queries, candidates, answers_for(), scores, JudgeConfig(protocol="debiased"))
    assert [(i["label"], i["target_persona"]) for i in debiased] == [(1, "math"), (0, "math"), (1, "math")]
    assert debiased[2]["margin"] == pytest.approx(2.795, abs=1e-3)
    assert stats["persona_wins_both_rate"] == pytest.approx(3 / 9)


def test_best_of_k_highest_margin_winner_beats_an_unparseable_higher_margin():
    candidates = {"coding-0000": NAMES}
    scores = _best_of_k_scores("coding-0000", {
        "coding": ([-2.0, -1.0, -4.0], [-1.0, -2.0, -4.0]),        # +1.0, mass fine
        "math": ([-9.0, -3.0, -9.0], [-3.0, -9.0, -9.0]),          # +6.0, but ~5 % mass
        "writing": LOSE})
    config = JudgeConfig(protocol="debiased", min_choice_mass=0.5)
    items, stats = label_queries(QUERIES[:1], candidates, answers_for(), scores, config)
    assert (items[0]["label"], items[0]["target_persona"]) == (1, "coding")
    assert stats["unparseable"] == 1


def test_label_queries_pointwise():
    scores = {
        "point/coding-0000/__base__": point(5), "point/coding-0000/coding": point(8),
        "point/coding-0001/__base__": point(6), "point/coding-0001/coding": point(4),
        "point/math-0000/__base__": point(7), "point/math-0000/math": point(10),
        "point/math-0001/__base__": point(6), "point/math-0001/math": point(9, total=0.01),
    }
    config = JudgeConfig(protocol="pointwise", margin=1.0, min_choice_mass=0.5)
    items, stats = label_queries(QUERIES, MATCHED, answers_for(), scores, config)
    assert [i["label"] for i in items] == [1, 0, 1, 0]
    assert items[0]["margin"] == pytest.approx(3.0, abs=0.05)
    assert items[1]["margin"] == pytest.approx(-2.0, abs=0.05)
    assert items[2]["margin"] == pytest.approx(3.0, abs=0.1)
    assert stats["unparseable"] == 1
    assert stats["position_bias_rate"] is None
    higher, _ = label_queries(QUERIES, MATCHED, answers_for(), scores,
                              JudgeConfig(protocol="pointwise", margin=3.5, min_choice_mass=0.5))
    assert [i["label"] for i in higher] == [0, 0, 0, 0]


# ----------------------------------------------------------------------------------- controls
def test_control_pairs_never_self_and_prefers_other_persona():
    queries = [{"id": f"{p}-{k:04d}", "persona": p, "query": f"q {p} {k}"}
               for p in ("coding", "math", "writing") for k in range(4)]
    for seed in range(5):
        pairs = control_pairs(queries, 6, seed=seed)
        assert len(pairs) == 6
        assert len({q["id"] for q, _ in pairs}) == 6
        for query, other in pairs:
            assert query["id"] != other["id"]
            assert query["persona"] != other["persona"]
    assert control_pairs(queries, 6, seed=3) == control_pairs(queries, 6, seed=3)
    assert len(control_pairs(queries, 100)) == len(queries)
    assert control_pairs(queries, 0) == []


def test_control_pairs_single_persona_falls_back_to_other_queries():
    queries = [{"id": f"coding-{k:04d}", "persona": "coding", "query": f"q {k}"} for k in range(3)]
    pairs = control_pairs(queries, 3)
    assert len(pairs) == 3
    assert all(q["id"] != o["id"] for q, o in pairs)
    assert control_pairs(queries[:1], 5) == []


def _control_scores(pairs, outcomes) -> dict:
    return {f"control/{q['id']}/{o['id']}": pair(s) for (q, o), s in zip(pairs, outcomes)}


def test_control_accuracy_pairwise():
    pairs = control_pairs(QUERIES, 4)
    scores = _control_scores(pairs, [WIN, WIN, BIASED_UP, LOSE])
    debiased = control_accuracy(pairs, scores, JudgeConfig(protocol="debiased"))
    low, high = wilson_interval(3, 4)
    assert debiased == {"control_accuracy": 0.75, "control_n": 4,
                        "control_ci95": [round(low, 4), round(high, 4)]}
    strict = control_accuracy(pairs, scores, JudgeConfig(protocol="strict"))
    assert strict["control_accuracy"] == 0.5
    assert strict["control_ci95"] == [round(v, 4) for v in wilson_interval(2, 4)]
    assert strict["control_ci95"][0] < 0.5 < strict["control_ci95"][1]


def test_control_accuracy_pointwise():
    pairs = control_pairs(QUERIES, 4)
    scores = {}
    for k, (q, o) in enumerate(pairs):
        scores[f"point/{q['id']}/{BASELINE}"] = point(8)
        scores[f"point/control/{q['id']}/{o['id']}"] = point(3 if k else 9)
    result = control_accuracy(pairs, scores, JudgeConfig(protocol="pointwise", margin=0.0))
    assert result["control_accuracy"] == 0.75 and result["control_n"] == 4
    assert result["control_ci95"] == [round(v, 4) for v in wilson_interval(3, 4)]


def test_control_accuracy_without_pairs():
    assert control_accuracy([], {}, JudgeConfig()) == {"control_accuracy": None, "control_n": 0,
                                                       "control_ci95": [0.0, 1.0]}


def test_score_points_stores_the_two_forward_grade_log_probs(tiny_backbone, tmp_path):
    """The corpus judge's pointwise grades, read in one forward, equal scoring prompt and prompt + "1" apart
    (SmolLM2 writes "10" as "1", "0": grade 10 is "1" then "0", grade 1 is "1" less that)."""
    from prism_lightning.bootstrap.judge import Judge
    from prism_lightning.model.generation import next_token_logprobs
    from prism_lightning.utils.jsonl import JsonlSink, read_jsonl

    judge = Judge(tiny_backbone, JudgeConfig(protocol="pointwise"))
    tok = tiny_backbone.tokenizer
    digits = [tok(str(d), add_special_tokens=False)["input_ids"][0] for d in range(10)]
    answers = [{"id": "a", "question": "What is 2+2?", "answer": "4"},
               {"id": "b", "question": "Name a colour, with a short reason why you like it.", "answer": "Blue."}]
    path = tmp_path / "points.jsonl"
    judge.score_points(answers, JsonlSink(path), "grades")
    stored = {r["id"]: r for r in read_jsonl(path)}
    for answer in answers:
        ids = judge._prompt_ids(POINTWISE.format(question=answer["question"], answer=answer["answer"]))
        args = (tiny_backbone.model, tiny_backbone.tokenizer.pad_token_id, tiny_backbone.device)
        first = next_token_logprobs(*args, [ids])[0]
        after_one = next_token_logprobs(*args, [ids + [digits[1]]])[0]
        grades = stored[answer["id"]]["grades"]
        ten = float(first[digits[1]] + after_one[digits[0]])
        assert grades[1:9] == pytest.approx(first[digits[2:]].tolist(), abs=1e-4)
        assert grades[9] == pytest.approx(ten, abs=1e-4)
        assert math.exp(grades[0]) == pytest.approx(math.exp(float(first[digits[1]])) - math.exp(ten), abs=1e-6)
