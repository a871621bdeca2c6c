"""Several judged pairs per query: win probabilities, split-half reliability, its AUROC ceiling, soft gate targets."""

from __future__ import annotations

import math
import random

import pytest
import torch

from prism_lightning.bootstrap.answers import BASELINE, sample_key
from prism_lightning.bootstrap.config import JudgeConfig
from prism_lightning.bootstrap.labels import label_queries, main_comparisons
from prism_lightning.bootstrap.reliability import auroc_ceiling, label_reliability, reliability_text, spearman_brown
from prism_lightning.model.gate_mlp import route_loss, soft_route_loss, soft_targets
from prism_lightning.training.gate_verdict import gate_verdict


def lik(cond: float) -> dict:
    return {"cond": cond, "uncond": 0.0, "tokens": 1}


def synthetic(n_queries: int, samples: int, p_win, seed: int = 0):
    """Queries, answers and likelihood scores where query q's persona answer wins pair i with probability p_win(q)."""
    rng = random.Random(seed)
    queries = [{"id": f"q{k:03d}", "persona": "math", "query": f"question {k}"} for k in range(n_queries)]
    answers, scores = {}, {}
    for k, q in enumerate(queries):
        answers[q["id"]] = {}
        for i in range(samples):
            for name in (BASELINE, "math"):
                answers[q["id"]][sample_key(name, i)] = f"{name} {i} to {k}"
            won = rng.random() < p_win(k)
            scores[f"lik/{q['id']}/{sample_key('math', i)}"] = lik(-1.0 if won else -3.0)
            scores[f"lik/{q['id']}/{sample_key(BASELINE, i)}"] = lik(-2.0)
    return queries, {q["id"]: ["math"] for q in queries}, answers, scores


def test_query_dependent_judge_is_reliable_and_coin_flips_are_not():
    # A judge whose verdicts follow the query (half the queries win 90 % of pairs, half 10 %) vs coin flips.
    queries, cands, answers, scores = synthetic(200, 8, lambda k: 0.9 if k % 2 else 0.1)
    items, stats = label_queries(queries, cands, answers, scores, JudgeConfig(protocol="likelihood"), samples=8)
    rel = stats["reliability"]
    assert rel["reliability"] > 0.9 and rel["reliability_ci95"][0] > 0.8
    assert rel["auroc_ceiling"] > 0.95
    assert [i["label"] for i in items[:6]] == [0, 1, 0, 1, 0, 1]
    queries, cands, answers, scores = synthetic(200, 8, lambda k: 0.5, seed=1)
    _, stats = label_queries(queries, cands, answers, scores, JudgeConfig(protocol="likelihood"), samples=8)
    rel = stats["reliability"]
    assert abs(rel["reliability"]) < 0.3 and rel["reliability_ci95"][0] < 0 < rel["reliability_ci95"][1]
    assert "no gate can be shown to beat chance" in reliability_text(rel)


def test_items_carry_win_probability_every_sample_and_the_clearest_pair():
    queries, cands, answers, scores = synthetic(3, 4, lambda k: 0.5, seed=3)
    # Query 0: the persona wins pairs 0, 1, 3 (3 of 4); pair 1 by the largest margin.
    for i, cond in enumerate((-1.5, -0.5, -3.0, -1.0)):
        scores[f"lik/q000/{sample_key('math', i)}"] = lik(cond)
    items, _ = label_queries(queries, cands, answers, scores, JudgeConfig(protocol="likelihood"), samples=4)
    first = items[0]
    assert first["win_prob"] == 0.75 and first["label"] == 1 and first["sample"] == 1
    assert first["persona_answer"] == "math 1 to 0" and first["baseline_answer"] == "__base__ 1 to 0"
    assert first["margin"] == pytest.approx((0.5 + 1.5 - 1.0 + 1.0) / 4)
    assert [s["verdicts"]["math"]["label"] for s in first["samples"]] == [1, 1, 0, 1]
    assert len(first["samples"]) == 4 and first["samples"][2]["persona_answers"]["math"] == "math 2 to 0"


def test_half_the_pairs_is_retain_and_one_sample_is_todays_label():
    queries, cands, answers, scores = synthetic(1, 2, lambda k: 0.5)
    scores["lik/q000/math"], scores["lik/q000/math~1"] = lik(-1.0), lik(-3.0)
    items, _ = label_queries(queries, cands, answers, scores, JudgeConfig(protocol="likelihood"), samples=2)
    assert items[0]["win_prob"] == 0.5 and items[0]["label"] == 0 and items[0]["sample"] == 1
    items, stats = label_queries(queries, cands, answers, scores, JudgeConfig(protocol="likelihood"))
    assert items[0]["label"] == 1 and items[0]["win_prob"] == 1.0 and "samples" not in items[0]
    assert stats["reliability"]["reliability"] is None
    assert "data.labels.samples = 1" in stats["reliability"]["reason"]
    assert "not measured" in reliability_text(stats["reliability"])


def test_sample_zero_keeps_the_single_sample_ids():
    queries, cands, _, _ = synthetic(1, 1, lambda k: 0.5)
    one = main_comparisons(queries, cands)
    three = main_comparisons(queries, cands, samples=3)
    assert [c.id for c in one] == ["q000/math"]
    assert [c.id for c in three] == ["q000/math", "q000/math~1", "q000/math~2"]
    assert three[2].baseline_key == "q000/__base__~2"


def test_spearman_brown_and_the_auroc_ceiling():
    assert spearman_brown(0.5) == pytest.approx(2 / 3)
    assert auroc_ceiling(0.0, 0.3) == 0.5 and auroc_ceiling(-0.2, 0.3) == 0.5 and auroc_ceiling(1.0, 0.3) == 1.0
    assert math.isnan(auroc_ceiling(0.5, 0.0))
    values = [auroc_ceiling(r, 0.4) for r in (0.05, 0.2, 0.5, 0.9)]
    assert values == sorted(values) and 0.5 < values[0] < values[-1] < 1.0
    # Check against a simulation of the binormal model: true score t, observed o = t + noise, label o > threshold.
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(200_000, generator=gen)
    o = t + torch.randn(200_000, generator=gen)  # reliability 0.5
    label = (o > o.quantile(0.6)).long()
    from torchmetrics.functional.classification import binary_auroc
    assert float(binary_auroc(t, label)) == pytest.approx(auroc_ceiling(0.5, 0.4), abs=0.01)


def test_reliability_interval_absent_below_five_queries():
    rel = label_reliability([[1, 0], [0, 1], [1, 1], [0, 0]])
    assert rel["reliability_ci95"] is None and "n < 5" in rel["reliability_reason"]
    assert "n < 5" in reliability_text(rel)


def test_soft_loss_equals_hard_loss_on_one_hot_targets_and_bce_on_soft_ones():
    logits = torch.tensor([[0.3], [-1.2], [2.0]])
    routes = torch.tensor([1, 0, 1])
    one_hot = torch.nn.functional.one_hot(routes, 2).float()
    assert soft_route_loss(logits, one_hot) == pytest.approx(float(route_loss(logits, routes)))
    p = torch.tensor([0.75, 0.25, 0.5])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits.squeeze(-1), p)
    assert soft_route_loss(logits, torch.stack([1 - p, p], 1)) == pytest.approx(float(expected))
    k_way = torch.tensor([[0.3, -0.5], [1.0, 2.0]])
    k_routes = torch.tensor([2, 0])
    k_hot = torch.nn.functional.one_hot(k_routes, 3).float()
    assert soft_route_loss(k_way, k_hot) == pytest.approx(float(route_loss(k_way, k_routes)))


def test_soft_targets_open_as_often_as_the_best_adapter_wins():
    assert soft_targets({0: 1.0}, 1) == [0.0, 1.0] and soft_targets({0: 0.0}, 1) == [1.0, 0.0]
    assert soft_targets({0: 0.25}, 1) == [0.75, 0.25]
    t = soft_targets({0: 0.6, 1: 0.2}, 2)
    assert t == pytest.approx([0.4, 0.45, 0.15]) and sum(t) == pytest.approx(1.0)


def test_gate_verdict_quotes_the_labels_reliability():
    logits, labels = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]), torch.tensor([0, 1, 0, 1, 0, 1])
    rel = {"samples": 4, "queries": 72, "reliability": 0.04, "reliability_ci95": [-0.1, 0.19],
           "auroc_ceiling": 0.55, "auroc_ceiling_ci95": [0.5, 0.6]}
    text = gate_verdict(logits, labels, reliability=rel).text
    assert "split-half reliability 0.04 (95% CI -0.10 to 0.19)" in text
    assert "no gate can be shown to beat chance" in text
    assert "not measured" in gate_verdict(logits, labels, reliability={"samples": 1, "reliability": None,
                                                                       "reason": "one sample"}).text


def _builder(base, directory, samples: int, judge_batch: int = 4):
    from prism_lightning.bootstrap.config import AnswerConfig, LabelConfig, QueryConfig
    from prism_lightning.bootstrap.corpus import CorpusBuilder
    from prism_lightning.contexts.personas import PersonaConfig
    from prism_lightning.model.generation import DecodingConfig

    return CorpusBuilder(base.config, PersonaConfig(names=["math", "writing"], granularity="min"),
                         QueryConfig(per_persona=3, max_rounds=1, min_chars=1, min_words=1,
                                     decoding=DecodingConfig(temperature=0.9, max_new_tokens=12, batch_size=4)),
                         AnswerConfig(decoding=DecodingConfig(temperature=0.7, max_new_tokens=8, batch_size=2)),
                         JudgeConfig(protocol="likelihood", control_pairs=2, batch_size=judge_batch,
                                     max_answer_tokens=8),
                         "system", directory, LabelConfig(samples=samples))


def test_a_corpus_of_several_samples_on_the_tiny_model(tiny_backbones, tmp_path):
    from prism_lightning.utils.jsonl import read_jsonl

    base = tiny_backbones(seed=0)
    one = _builder(base, tmp_path / "corpus", 1).build()
    four = _builder(base, tmp_path / "corpus", 4).build()
    # m is part of the answer and judge stages' keys (never of the queries'), and m = 1 keeps today's keys.
    assert one.manifest["stages"]["queries"] == four.manifest["stages"]["queries"]
    assert one.manifest["stages"]["answers"] != four.manifest["stages"]["answers"]
    assert one.manifest["stages"]["judge"] != four.manifest["stages"]["judge"]
    assert one.manifest["labels"]["reliability"] is None and four.manifest["labels"]["samples"] == 4
    # Every query: 4 baseline and 4 persona answers, each pair judged; the label is its win probability > 0.5.
    answers = read_jsonl(tmp_path / "corpus" / "stages" / f"answers-{four.manifest['stages']['answers']}.jsonl")
    assert len(answers) == len(four.items) * 8
    for item in four.items:
        verdicts = [s["verdicts"][item["target_persona"]]["label"] for s in item["samples"]]
        assert item["win_prob"] == sum(verdicts) / 4 and item["label"] == int(item["win_prob"] > 0.5)
        texts = {s["persona_answers"][item["target_persona"]] for s in item["samples"]}
        assert item["persona_answer"] in texts
    # The 4 draws of one prompt are sampled in one generate call (the same batch, hence the same seed record).
    by_prompt: dict[str, set] = {}
    for record in answers:
        by_prompt.setdefault(record["id"].split("~")[0], set()).add(record["id"])
    assert all(len(ids) == 4 for ids in by_prompt.values())
    # A rerun finds every stage done and writes the same corpus.
    again = _builder(base, tmp_path / "corpus", 4).build()
    assert again.items == four.items and again.manifest["labels"] == four.manifest["labels"]


def test_samples_below_one_is_one_line(tmp_path):
    from prism_lightning.bootstrap.config import LabelConfig
    from prism_lightning.training.datamodule import BootstrapDataModule
    from prism_lightning.utils.errors import PrismError

    with pytest.raises(PrismError, match="data.labels.samples"):
        BootstrapDataModule(labels=LabelConfig(samples=0))


def test_the_collator_gives_soft_targets_and_the_gate_trains_on_them():
    from prism_lightning.training.modules.gate import IntentGate

    gate = IntentGate(hidden_size=8, targets="soft", standardize=False)  # the loss math, on fixed inputs
    features = torch.randn(4, 8)
    batch = {"features": features, "label": torch.tensor([1.0, 0.0, 0.0, 1.0]),
             "soft_route": torch.tensor([[0.25, 0.75], [1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])}
    expected = torch.nn.functional.binary_cross_entropy_with_logits(gate.mlp(features),
                                                                    batch["soft_route"][:, 1])
    assert float(gate.batch_loss(features, batch)) == pytest.approx(float(expected))
    hard = IntentGate(hidden_size=8, standardize=False)
    hard.mlp.load_state_dict(gate.mlp.state_dict())
    assert float(hard.batch_loss(features, batch)) == pytest.approx(float(
        torch.nn.functional.binary_cross_entropy_with_logits(gate.mlp(features), batch["label"])))
    with pytest.raises(Exception, match="soft_route"):
        gate.batch_loss(features, {"features": features, "label": batch["label"]})


def test_collated_soft_targets_equal_the_hard_routes_at_one_sample(smol_tokenizer):
    from prism_lightning.model.chat import ChatFormatter
    from prism_lightning.training.datamodule import Collator

    def item(k: int, label: int, **extra) -> dict:
        return {"id": f"q{k}", "query": f"question {k}", "label": label, "target_persona": "math",
                "persona_answer": "persona", "baseline_answer": "base", **extra}

    collate = Collator(ChatFormatter(smol_tokenizer), {"math": "You are a mathematician."})
    old = collate([item(0, 1), item(1, 0)])  # a corpus from before samples: the label is the target
    assert old["soft_route"].tolist() == [[0.0, 1.0], [1.0, 0.0]]
    one = collate([item(0, 1, win_prob=1.0), item(1, 0, win_prob=0.0)])
    assert torch.equal(torch.nn.functional.one_hot(one["route"], 2).float(), one["soft_route"])
    four = collate([item(0, 1, win_prob=0.75), item(1, 0, win_prob=0.25)])
    assert four["soft_route"].tolist() == [[0.25, 0.75], [0.75, 0.25]]
    k_way = Collator(ChatFormatter(smol_tokenizer), {"math": "m", "poet": "p"}, adapter_of={"math": 0, "poet": 1})
    batch = k_way([item(0, 1, win_prob=0.75, win_probs={"math": 0.75, "poet": 0.25})])
    assert batch["soft_route"].tolist()[0] == pytest.approx([0.25, 0.5625, 0.1875])
