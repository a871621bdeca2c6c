"""PRISM as an lm-evaluation-harness model (issue #28): ``PrismLM`` on a tiny random export, checked against
``GatedModel`` and ``prism test``'s own MMLU scorer; the project's offline tasks through ``simple_evaluate``; and
``prism lm-eval`` through the real CLI, writing the routing rates beside lm-eval's results file."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from test_serve import make_export  # noqa: E402
from test_cli_fit import save_tiny_model  # noqa: E402

from prism_lightning.evaluation import mmlu  # noqa: E402
from prism_lightning.harness.command import TASKS_DIR  # noqa: E402
from prism_lightning.harness.lm import PrismLM  # noqa: E402
from prism_lightning.model.row_routing import BASE  # noqa: E402
from prism_lightning.utils.errors import PrismError  # noqa: E402

PRISM = [sys.executable, "-m", "prism_lightning.cli"]
PAIRS = [("What is the capital of France? Answer:", " Paris"), ("Write a poem about the sea.", " Waves"),
         ("2 + 2 =", " 4"), ("Name a prime number:", " seven, or eleven"), ("Q: colour of the sky? A:", " blue")]
PAIRS_CONTEXTS = [c for c, _ in PAIRS]
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def export(smol_tokenizer, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lmeval")
    return make_export(root / "export", save_tiny_model(root / "model", smol_tokenizer, seed=0))


@pytest.fixture(scope="module")
def lm(export) -> PrismLM:
    model = PrismLM(export=str(export), route="gate", batch_size=3)
    # Threshold at the median probability over varied prompts: the gate routes some rows each way.
    probs = model.gated.route([model.tok_encode(p) for p in (*PAIRS_CONTEXTS, "Tell me a story.", "What is LoRA?")])
    model.gated.threshold = float(probs.median())
    return model


def _requests(kind: str, args: list[tuple], task: str = "t") -> list[Instance]:
    return [Instance(kind, {}, a, i, (task, i, 1)) for i, a in enumerate(args)]


def _manual_logprob(lm: PrismLM, context: list[int], continuation: list[int], route: str) -> float:
    """One unbatched forward of context + continuation on the route, summed log-probs of the continuation."""
    model = lm.gated.model
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        if route == BASE:
            with model.disable_adapter():
                logits = model(input_ids=ids).logits
        else:
            logits = model(input_ids=ids).logits
    logprobs = torch.log_softmax(logits[0, len(context) - 1:-1].float(), -1)
    return float(logprobs.gather(-1, torch.tensor(continuation)[:, None]).sum())


def test_loglikelihood_is_the_routed_models(lm):
    pairs = PAIRS
    out = lm.loglikelihood(_requests("loglikelihood", pairs))
    names, probs = lm.gated.routes([lm.tok_encode(c) for c, _ in pairs], "gate")
    assert set(names) == {BASE, lm.gated.adapter_name}, "the test needs both routes in one batch"
    for (context, continuation), (logprob, greedy), name in zip(pairs, out, names):
        ctx = lm.tok_encode(context)
        cont = lm.tok_encode(context + continuation)[len(ctx):]
        assert logprob == pytest.approx(_manual_logprob(lm, ctx, cont, name), abs=1e-4)
        assert isinstance(greedy, bool)
    rates = lm.routing.rates()["t"]
    assert rates["prompts"] == 5 and sum(r["prompts"] for r in rates["routes"].values()) == 5
    opened = sum(p >= lm.gated.threshold for p in probs.tolist())
    assert rates["routes"]["adapter"]["prompts"] == opened


def test_greedy_flag_matches_argmax(lm):
    context = lm.tok_encode("The quick brown fox")
    base = PrismLM.__new__(PrismLM)  # same model, base route: no second load
    base.__dict__.update(lm.__dict__, route="base", routing=type(lm.routing)())
    with torch.no_grad(), lm.gated.model.disable_adapter():
        step = lm.gated.model(input_ids=torch.tensor([context])).logits[0, -1].argmax().item()
    text = lm.tokenizer.decode([step])
    [(lp_greedy, is_greedy)] = base._loglikelihood_tokens([(("", ""), context, [step])])
    [(_, not_greedy)] = base._loglikelihood_tokens([(("", ""), context, [(step + 1) % len(lm.tokenizer)])])
    assert is_greedy and not not_greedy, text
    with torch.no_grad(), lm.gated.model.disable_adapter():  # two greedy steps: the multi-token path
        second = lm.gated.model(input_ids=torch.tensor([context + [step]])).logits[0, -1].argmax().item()
    [(_, both)] = base._loglikelihood_tokens([(("", ""), context, [step, second])])
    [(_, last_wrong)] = base._loglikelihood_tokens([(("", ""), context, [step, (second + 1) % len(lm.tokenizer)])])
    assert both and not last_wrong
    assert lp_greedy == pytest.approx(_manual_logprob(lm, context, [step], BASE), abs=1e-4)


def test_rolling_loglikelihood_scores_every_token_once(lm):
    doc = "Low-rank adapters change a model a little; the gate decides when they run at all."
    [total] = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(doc,)], task="ppl"))
    tokens = lm.tok_encode(doc)
    first = tuple([lm.prefix_token_id] + tokens)
    name = BASE if lm.routing.records[-1][2] == "base" else lm.gated.adapter_name
    assert lm.routing.records[-1][1] == first
    assert total == pytest.approx(_manual_logprob(lm, [lm.prefix_token_id], tokens, name), abs=1e-3)
    short = PrismLM.__new__(PrismLM)
    short.__dict__.update(lm.__dict__, max_length=8, routing=type(lm.routing)())
    [windowed] = short.loglikelihood_rolling(_requests("loglikelihood_rolling", [(doc,)]))
    assert math.isfinite(windowed) and windowed != pytest.approx(total, abs=1e-3)  # less context per token


def test_generate_until_cuts_at_stop_strings_on_each_route(lm):
    prompts = ["Tell me a story.", "List three colours:", "What is LoRA?"]
    kwargs = {"until": ["e"], "max_gen_toks": 12, "do_sample": False}
    out = lm.generate_until(_requests("generate_until", [(p, kwargs) for p in prompts], task="gen"))
    ids = [lm.tok_encode(p) for p in prompts]
    names, _ = lm.gated.routes(ids, "gate")
    from prism_lightning.model.generation import DecodingConfig

    for i, (text, name) in enumerate(zip(out, names)):
        [full] = lm.gated.generate_rows([ids[i]], [name], DecodingConfig(max_new_tokens=12))
        assert "e" not in text and full["text"].startswith(text)
    with pytest.raises(PrismError, match="num_beams"):
        lm.generate_until(_requests("generate_until", [("x", {"until": [], "num_beams": 2})]))


def test_bad_model_args_are_one_line(export):
    with pytest.raises(PrismError, match="unknown key.*pretrained"):
        PrismLM(export=str(export), pretrained="gpt2")
    with pytest.raises(PrismError, match="route: expected one of gate, adapter, base"):
        PrismLM(export=str(export), route="sometimes")


def test_simple_evaluate_local_mmlu_equals_prism_tests_scorer(lm):
    """``prism_mmlu_chat`` with the chat template scores the very tokens ``prism test`` scores, per question."""
    manager = TaskManager(include_path=str(TASKS_DIR), metadata={"n": 60, "seed": 0})
    lm.routing = type(lm.routing)()
    results = simple_evaluate(model=lm, tasks=["prism_mmlu_chat"], limit=6, apply_chat_template=True,
                              task_manager=manager, log_samples=True)
    rows = mmlu.stratified_sample(mmlu.load_mmlu()[0], 60, 0)[:6]
    ids = [lm.gated.prompt_ids(mmlu.prompt_text(r)) for r in rows]
    logprobs, _ = lm.gated.token_logprobs(ids, None, "gate", tail=1)
    letters = mmlu.letter_reader(lm.gated.formatter).read(lambda p, cols, tail: lm.gated.token_logprobs(
        p, cols, "gate", tail=tail)[0], ids).logprobs
    samples = sorted(results["samples"]["prism_mmlu_chat"], key=lambda s: s["doc_id"])
    for sample, row, expected in zip(samples, rows, letters):
        assert sample["doc"]["question"] == row["question"]
        got = torch.tensor([float(r[0][0]) for r in sample["resps"]])
        assert torch.allclose(got, expected, atol=1e-4), (got, expected)
    accuracy = float(mmlu.score(letters, rows, [0, 1, 2, 3]).float().mean())
    assert results["results"]["prism_mmlu_chat"]["acc,none"] == pytest.approx(accuracy)
    rates = lm.routing.rates()["prism_mmlu_chat"]
    assert rates["requests"] == 24 and rates["prompts"] == 6  # four letters per question, one prompt


def test_mt_bench_task_generates_and_routes(lm):
    lm.routing = type(lm.routing)()
    manager = TaskManager(include_path=str(TASKS_DIR))
    results = simple_evaluate(model=lm, tasks=["prism_mt_bench"], limit=2, gen_kwargs="max_gen_toks=4",
                              task_manager=manager)
    assert "prism_mt_bench" in results["results"]
    assert lm.routing.rates()["prism_mt_bench"]["prompts"] == 2


def test_prism_lm_eval_cli_writes_routing_beside_results(export, tmp_path):
    out = tmp_path / "results"
    env = {**os.environ, **OFFLINE}
    run = subprocess.run([*PRISM, "lm-eval", "--model", "prism", "--model_args", f"export={export},route=gate",
                          "--tasks", "prism_mmlu", "--limit", "5", "--metadata", '{"n": 40}', "--batch_size", "4",
                          "--output_path", str(out)], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Routing per task" in run.stdout and "prism_mmlu" in run.stdout
    [results] = list(out.rglob("results_*.json"))
    routing = results.with_name("routing_" + results.name[len("results_"):])
    data = json.loads(routing.read_text())
    task = data["tasks"]["prism_mmlu"]
    assert data["route"] == "gate" and task["prompts"] == 5 and task["requests"] == 20
    assert sum(r["share"] for r in task["routes"].values()) == pytest.approx(1.0)
    assert set(task["gate_probability"]) == {"p10", "p25", "p50", "p75", "p90"}
    assert json.loads(results.read_text())["results"]["prism_mmlu"]["acc,none"] >= 0

    bad = subprocess.run([*PRISM, "lm-eval", "--model", "prism", "--model_args", f"export={export},route=maybe",
                          "--tasks", "prism_mmlu", "--limit", "1"], capture_output=True, text=True, cwd=tmp_path,
                         env=env, timeout=600)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --model_args route: expected one of")
    missing = subprocess.run([*PRISM, "lm-eval", "--model", "prism", "--model_args", f"export={export}",
                              "--tasks", "prism_mmlu,no_such_task"], capture_output=True, text=True, cwd=tmp_path,
                             env=env, timeout=600)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].startswith("error: lm-eval: Tasks not found"), missing.stderr[-2000:]
