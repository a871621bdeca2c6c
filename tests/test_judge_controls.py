"""Likelihood protocols, quality controls (degraded copies), the two-control verdict and the protocol comparison."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from prism_lightning.bootstrap.answers import BASELINE
from prism_lightning.bootstrap.compare import best_protocol, compare_protocols, print_comparison
from prism_lightning.bootstrap.config import JudgeConfig
from prism_lightning.bootstrap.degrade import KINDS, cut, degrade, shuffle, splice
from prism_lightning.bootstrap.labels import (
    control_accuracy,
    control_pairs,
    controls_verdict,
    label_queries,
    main_comparisons,
    quality_accuracy,
    quality_comparisons,
    relevance_comparisons,
    scoring_items,
)
from prism_lightning.bootstrap.protocols import likelihood_score
from prism_lightning.bootstrap.source_bias import cross_comparisons, cross_source_accuracy, source_bias
from prism_lightning.training.summary import judge_verdict
from prism_lightning.utils.stats import wilson_interval

ANSWER = ("Sort the list first. Then walk it once, comparing neighbours. Equal neighbours are duplicates. "
          "Remove them as you go.")


# --------------------------------------------------------------------------- degraded copies
def test_shuffle_reorders_whole_sentences_and_keeps_every_word():
    out = shuffle(ANSWER, seed=1)
    assert out != ANSWER and Counter(out.split()) == Counter(ANSWER.split())
    assert "Sort the list first." in out and not out.startswith("Sort")  # whole sentences, another order
    one_sentence = "a b c d e f g h i j k l m n"  # one sentence: shuffled in chunks of about six words
    assert shuffle(one_sentence) != one_sentence
    assert Counter(shuffle(one_sentence).split()) == Counter(one_sentence.split())
    assert shuffle("Too short.") == "Too short." and shuffle(ANSWER, 3) == shuffle(ANSWER, 3)


def test_cut_keeps_the_first_forty_percent_unfinished():
    words = ANSWER.split()
    out = cut(ANSWER)
    assert out.split() == [w.rstrip(".") if k == len(out.split()) - 1 else w
                           for k, w in enumerate(words[:int(len(words) * 0.4)])]
    assert not out.endswith((".", "!", "?")) and cut("Yes.") == "Yes"


def test_splice_replaces_the_middle_third_with_the_donor_and_keeps_the_length():
    words = ANSWER.split()
    out = splice(ANSWER, "bananas grow in warm wet climates").split()
    third, two_thirds = len(words) // 3, 2 * len(words) // 3
    assert len(out) == len(words)
    assert out[:third] == words[:third] and out[two_thirds:] == words[two_thirds:]
    assert out[third:third + 3] == ["bananas", "grow", "in"] and "bananas" not in words
    assert splice("a b", "x y") == "x y"


def test_degrade_dispatches_every_kind_and_rejects_others():
    assert {degrade(ANSWER, k, "donor words here") for k in KINDS} == {
        shuffle(ANSWER), cut(ANSWER), splice(ANSWER, "donor words here")}
    with pytest.raises(ValueError, match="shuffle, cut, splice"):
        degrade(ANSWER, "blur")


# --------------------------------------------------------------------------- likelihood scores
def test_likelihood_and_pmi_are_per_token_and_pmi_discounts_the_unconditional_likelihood():
    cond = torch.tensor([-20.0, -30.0, -5.0])
    uncond = torch.tensor([-40.0, -31.0, -5.0])
    tokens = torch.tensor([10, 10, 0])
    score, empty = likelihood_score(cond, uncond, tokens, "likelihood")
    assert score[:2].tolist() == [-2.0, -3.0] and empty.tolist() == [False, False, True]
    pmi, _ = likelihood_score(cond, uncond, tokens, "pmi")
    assert pmi[:2].tolist() == pytest.approx([2.0, 0.1])
    with pytest.raises(ValueError):
        likelihood_score(cond, uncond, tokens, "bleu")


QUERIES = [{"id": f"{p}-{k:04d}", "persona": p, "query": f"question {p} {k}"}
           for p in ("coding", "math") for k in range(2)]
MATCHED = {q["id"]: [q["persona"]] for q in QUERIES}


def lik(cond: float, uncond: float, tokens: int = 10) -> dict:
    return {"cond": cond, "uncond": uncond, "tokens": tokens}


def test_likelihood_and_pmi_label_the_same_pairs_differently():
    # coding-0000: the persona answer is more likely (-1.0 vs -2.0 per token) but only because it is generic
    # (likely without the query too); PMI prefers the baseline, which the query explains better. coding-0001:
    # the other way round (PMI 1.0 vs 0.5 per token for the less likely persona answer).
    scores = {"lik/coding-0000/coding": lik(-10.0, -12.0), "lik/coding-0000/__base__": lik(-20.0, -40.0),
              "lik/coding-0001/coding": lik(-30.0, -40.0), "lik/coding-0001/__base__": lik(-20.0, -25.0),
              "lik/math-0000/math": lik(-10.0, -30.0), "lik/math-0000/__base__": lik(-20.0, -30.0),
              "lik/math-0001/math": lik(-10.0, -30.0, tokens=0), "lik/math-0001/__base__": lik(-20.0, -30.0)}
    answers = {q["id"]: {BASELINE: "b", q["persona"]: "p"} for q in QUERIES}
    items, stats = label_queries(QUERIES, MATCHED, answers, scores, JudgeConfig(protocol="likelihood"))
    assert [i["label"] for i in items] == [1, 0, 1, 0] and stats["unparseable"] == 1
    assert items[0]["margin"] == pytest.approx(1.0) and stats["position_bias_rate"] is None
    items, _ = label_queries(QUERIES, MATCHED, answers, scores, JudgeConfig(protocol="pmi"))
    assert [i["label"] for i in items] == [0, 1, 1, 0]
    assert items[0]["margin"] == pytest.approx(0.2 - 2.0)
    items, _ = label_queries(QUERIES, MATCHED, answers, scores, JudgeConfig(protocol="likelihood", margin=1.5))
    assert [i["label"] for i in items] == [0, 0, 0, 0]


# --------------------------------------------------------------------------- two control kinds
def test_comparisons_name_the_answers_each_protocol_reads():
    pairs = control_pairs(QUERIES, 3)
    answers = {q["id"]: {BASELINE: f"{ANSWER} ({q['id']})"} for q in QUERIES}
    relevance = relevance_comparisons(pairs, answers)
    quality = quality_comparisons(pairs, answers)
    for k, ((q, o), rel, qual) in enumerate(zip(pairs, relevance, quality)):
        assert rel.candidate == answers[q["id"]][BASELINE] and rel.baseline == answers[o["id"]][BASELINE]
        assert qual.candidate == answers[q["id"]][BASELINE]
        assert qual.baseline == degrade(answers[q["id"]][BASELINE], KINDS[k], answers[o["id"]][BASELINE], seed=k)
        assert qual.baseline != qual.candidate and qual.id == f"quality/{q['id']}"
    # Per-answer scorers score each answer once, however many comparisons read it.
    comparisons = relevance + quality
    points = scoring_items("pointwise", comparisons)
    assert len(points) == len({i["id"] for i in points}) == 3 * len(pairs)
    assert {i["id"] for i in scoring_items("likelihood", comparisons)} == {"lik/" + i["id"][6:] for i in points}
    assert [i["id"] for i in scoring_items("pairwise", comparisons)] == [c.id for c in comparisons]


def _quality_scores(pairs, outcomes) -> dict:
    """Likelihood records where the own answer beats its degraded copy where ``outcomes`` says so."""
    scores = {}
    for (q, _), good in zip(pairs, outcomes):
        scores[f"lik/{q['id']}/{BASELINE}"] = lik(-10.0, -20.0)
        scores[f"lik/quality/{q['id']}"] = lik(-15.0 if good else -5.0, -20.0)
    return scores


def test_quality_accuracy_overall_and_per_kind():
    queries = [{"id": f"q{k}", "persona": "ab"[k % 2], "query": f"question {k}"} for k in range(6)]
    pairs = control_pairs(queries, 6)
    result = quality_accuracy(pairs, _quality_scores(pairs, [True, True, False, True, False, False]),
                              JudgeConfig(protocol="likelihood"))
    low, high = wilson_interval(3, 6)
    assert result["quality_accuracy"] == 0.5 and result["quality_ci95"] == [round(low, 4), round(high, 4)]
    # Kinds in turn: shuffle (pairs 0, 3), cut (1, 4), splice (2, 5).
    assert {k: v["quality_accuracy"] for k, v in result["quality_by_kind"].items()} == {
        "shuffle": 1.0, "cut": 0.5, "splice": 0.0}
    assert quality_accuracy([], {}, JudgeConfig())["quality_n"] == 0


def test_verdict_needs_both_control_kinds_above_chance():
    above, chance = {"n": 40, "ci95": [0.7, 0.9]}, {"n": 40, "ci95": [0.35, 0.65]}

    def stats(relevance, quality) -> dict:
        return {"control_accuracy": 0.8, "control_n": relevance["n"], "control_ci95": relevance["ci95"],
                "quality_accuracy": 0.5, "quality_n": quality["n"], "quality_ci95": quality["ci95"]}

    assert controls_verdict(stats(above, above)) == "reliable"
    assert controls_verdict(stats(above, chance)) == "partial" and controls_verdict(stats(chance, above)) == "partial"
    assert controls_verdict(stats(chance, chance)) == "noise"
    assert "Both intervals lie above chance" in judge_verdict(stats(above, above))
    assert "The quality interval includes chance" in judge_verdict(stats(above, chance))
    assert "The relevance and quality intervals include chance" in judge_verdict(stats(chance, chance))
    assert "not measured" in judge_verdict({"control_accuracy": 0.8, "control_n": 40, "control_ci95": [0.7, 0.9]})


# --------------------------------------------------------------------------- comparison of protocols
def _pair(win: bool) -> dict:
    good, bad = -0.1, -3.0
    return ({"first": [bad, good, -5.0], "second": [good, bad, -5.0]} if win
            else {"first": [good, bad, -5.0], "second": [bad, good, -5.0]})


def _grades(g: int) -> dict:
    probs = [0.001] * 10
    probs[g - 1] = 0.99
    return {"grades": [math.log(p) for p in probs]}


def test_compare_protocols_reports_each_protocol_and_picks_the_one_whose_controls_lie_highest():
    queries = [{"id": f"q{k}", "persona": "ab"[k % 2], "query": f"question {k}"} for k in range(12)]
    candidates = {q["id"]: [q["persona"]] for q in queries}
    pairs = control_pairs(queries, 12)
    comparisons = (main_comparisons(queries, candidates) + relevance_comparisons(pairs) + quality_comparisons(pairs)
                   + cross_comparisons(pairs, candidates))
    # Pairwise: prefers the candidate of every comparison (the persona answer; the own answer in the controls).
    pairwise = {c.id: _pair(True) for c in comparisons}
    # Pointwise: grades everything 5: no preference, so it fails both controls.
    pointwise = {i["id"]: _grades(5) for i in scoring_items("pointwise", comparisons)}
    # Likelihood: the model's own no-persona answers likely, everything else unlikely; PMI agrees here. Its
    # relevance and quality controls (baseline vs worse baseline) are perfect: only the cross-source control sees
    # that it prefers the baseline source whatever the quality.
    likelihood = {i["id"]: lik(-5.0 if "__base__" in i["id"] else -30.0, -40.0)
                  for i in scoring_items("likelihood", comparisons)}
    result = compare_protocols(queries, candidates, pairs, {"pairwise": pairwise, "pointwise": pointwise,
                                                            "likelihood": likelihood}, JudgeConfig())
    rows = result["protocols"]
    assert list(rows) == ["strict", "debiased", "pointwise", "likelihood", "pmi"]
    assert rows["debiased"]["control_accuracy"] == 1.0 and rows["debiased"]["distill_rate"] == 1.0
    assert rows["pointwise"]["control_accuracy"] == 0.0 and rows["pointwise"]["verdict"] == "noise"
    assert rows["likelihood"]["quality_accuracy"] == 1.0 and rows["likelihood"]["distill_rate"] == 0.0
    assert result["agreement"]["debiased"]["likelihood"] == 0.0 and result["agreement"]["likelihood"]["pmi"] == 1.0
    assert result["agreement"]["strict"]["strict"] == 1.0
    assert rows["likelihood"]["cross_persona_accuracy"] == 0.0 and rows["likelihood"]["cross_baseline_accuracy"] == 1.0
    assert rows["likelihood"]["source_bias"] == "baseline" and rows["pmi"]["source_bias"] == "baseline"
    assert rows["likelihood"]["prefers_baseline"] == 1.0 and rows["debiased"]["prefers_baseline"] == 0.0
    assert rows["debiased"]["source_bias"] is None and rows["debiased"]["cross_persona_accuracy"] == 1.0
    # Equal control floors: ties go to the higher relevance accuracy, then table order.
    assert result["best"] == "strict"
    assert best_protocol({"pointwise": rows["pointwise"]}) is None


def test_print_comparison_shows_every_protocol(capsys):
    from rich.console import Console

    queries = [{"id": "q0", "persona": "a", "query": "x"}, {"id": "q1", "persona": "b", "query": "y"}]
    candidates = {q["id"]: [q["persona"]] for q in queries}
    pairs = control_pairs(queries, 2)
    comparisons = (main_comparisons(queries, candidates) + relevance_comparisons(pairs) + quality_comparisons(pairs)
                   + cross_comparisons(pairs, candidates))
    by_kind = {"pairwise": {c.id: _pair(False) for c in comparisons},
               "pointwise": {i["id"]: _grades(3) for i in scoring_items("pointwise", comparisons)},
               "likelihood": {i["id"]: lik(-9.0, -9.0) for i in scoring_items("likelihood", comparisons)}}
    print_comparison(compare_protocols(queries, candidates, pairs, by_kind, JudgeConfig()), Console(width=200))
    out = capsys.readouterr().out
    for protocol in ("strict", "debiased", "pointwise", "likelihood", "pmi"):
        assert protocol in out
    assert "No protocol without a source bias has both control intervals above chance" in out
    assert "persona>bad base" in out and "base>bad persona" in out


def test_control_accuracy_reads_a_protocol_other_than_the_configured_one():
    pairs = control_pairs(QUERIES, 4)
    scores = {}
    for k, (q, o) in enumerate(pairs):
        scores[f"lik/{q['id']}/{BASELINE}"] = lik(-10.0, -20.0)
        scores[f"lik/control/{q['id']}/{o['id']}"] = lik(-30.0 if k else -5.0, -20.0)
    result = control_accuracy(pairs, scores, JudgeConfig(protocol="debiased"), protocol="likelihood")
    assert result["control_accuracy"] == 0.75 and result["control_n"] == 4


# --------------------------------------------------------------------------- scoring with a model
def test_continuation_logprob_equals_the_full_forward(tiny_backbone):
    from prism_lightning.model.generation import continuation_logprob

    model, pad = tiny_backbone.model, tiny_backbone.tokenizer.pad_token_id
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    continuations = [[20, 21, 22], [23], []]
    got = continuation_logprob(model, pad, tiny_backbone.device, prompts, continuations)
    for k, (p, c) in enumerate(zip(prompts, continuations)):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + c])).logits[0].float()
        logprobs = torch.log_softmax(logits, -1)
        expected = sum(float(logprobs[len(p) - 1 + j, t]) for j, t in enumerate(c))
        assert float(got[k]) == pytest.approx(expected, abs=1e-4)


def test_score_likelihood_stores_conditional_and_unconditional_sums(tiny_backbone, tmp_path):
    from prism_lightning.bootstrap.judge import Judge
    from prism_lightning.model.generation import continuation_logprob
    from prism_lightning.utils.jsonl import JsonlSink, read_jsonl

    judge = Judge(tiny_backbone, JudgeConfig(protocol="pmi", batch_size=2))
    items = [{"id": "lik/a", "question": "What is 2+2?", "answer": "4"},
             {"id": "lik/b", "question": "Name a colour.", "answer": "Blue, because the sea is blue."},
             {"id": "lik/c", "question": "Why?", "answer": "Because."}]
    judge.score("likelihood", items, JsonlSink(tmp_path / "lik.jsonl"))
    stored = {r["id"]: r for r in read_jsonl(tmp_path / "lik.jsonl")}
    tok = tiny_backbone.tokenizer
    args = (tiny_backbone.model, tok.pad_token_id, tiny_backbone.device)
    for item in items:
        answer = tok(item["answer"], add_special_tokens=False)["input_ids"]
        cond = continuation_logprob(*args, [judge.formatter.prompt_ids(item["question"])], [answer])
        uncond = continuation_logprob(*args, [judge.formatter.prompt_ids("")], [answer])
        record = stored[item["id"]]
        assert record["tokens"] == len(answer)
        assert record["cond"] == pytest.approx(float(cond[0]), abs=1e-3)
        assert record["uncond"] == pytest.approx(float(uncond[0]), abs=1e-3)


# --------------------------------------------------------------------------- cross-source control
def _row(relevance: float, quality: float, persona: float, baseline: float, n: int = 40) -> dict:
    row = {}
    for prefix, acc in (("control", relevance), ("quality", quality), ("cross_persona", persona),
                        ("cross_baseline", baseline)):
        low, high = wilson_interval(round(acc * n), n)
        row.update({f"{prefix}_accuracy": acc, f"{prefix}_n": n, f"{prefix}_ci95": [low, high]})
    row["source_bias"] = source_bias(row)
    return row


def test_a_protocol_that_always_prefers_the_baseline_source_is_never_chosen():
    """Perfect relevance and quality controls (baseline vs worse baseline) cannot see it; the cross-source can."""
    rows = {"likelihood": _row(1.0, 1.0, 0.05, 1.0), "debiased": _row(0.8, 0.75, 0.7, 0.75)}
    assert rows["likelihood"]["source_bias"] == "baseline" and rows["debiased"]["source_bias"] is None
    assert best_protocol(rows) == "debiased"
    assert best_protocol({"likelihood": rows["likelihood"]}) is None
    assert _row(0.9, 0.9, 0.95, 0.2)["source_bias"] == "persona"
    assert _row(0.9, 0.9, 0.7, 0.8)["source_bias"] is None  # overlapping intervals: no verdict of bias


def test_cross_source_accuracy_reads_both_directions_from_stored_scores():
    queries = [{"id": f"q{k}", "persona": "ab"[k % 2], "query": f"question {k}"} for k in range(10)]
    candidates = {q["id"]: [q["persona"]] for q in queries}
    pairs = control_pairs(queries, 10)
    comparisons = main_comparisons(queries, candidates) + quality_comparisons(pairs) + cross_comparisons(pairs,
                                                                                                        candidates)
    # A scorer that prefers intact answers of either source over degraded ones, and is indifferent to the source.
    scores = {i["id"]: lik(-30.0 if ("quality/" in i["id"] or "cross_bad/" in i["id"]) else -5.0, -40.0)
              for i in scoring_items("likelihood", comparisons)}
    out = cross_source_accuracy(pairs, candidates, queries, scores, JudgeConfig(protocol="likelihood"))
    assert out["cross_persona_accuracy"] == 1.0 and out["cross_baseline_accuracy"] == 1.0
    assert out["cross_persona_n"] == out["cross_baseline_n"] == 10 and out["source_bias"] is None
    assert out["prefers_baseline"] == 0.0  # equal scores on the corpus pairs: a tie prefers neither
    assert "no source bias beyond the intervals" in judge_verdict({**out, "control_n": 10, "control_accuracy": 1.0,
                                                                   "control_ci95": [0.7, 1.0], "quality_n": 10,
                                                                   "quality_accuracy": 1.0,
                                                                   "quality_ci95": [0.7, 1.0]})
