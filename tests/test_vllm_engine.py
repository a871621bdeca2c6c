"""The vLLM engine of stages 1 and 2 (issue #27) against the Hugging Face path, on the embedded model.

Runs in the environment scripts/install-vllm.sh builds (`.venv-vllm/bin/python -m pytest tests/test_vllm_engine.py`);
without vLLM every test but the refusal skips.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import torch

from prism_lightning.bootstrap.config import JudgeConfig
from prism_lightning.bootstrap.judge import Judge
from prism_lightning.bootstrap.labels import PROTOCOLS, SCORER, Comparison, decide, scoring_items
from prism_lightning.model.backbone import BackboneConfig, load_backbone
from prism_lightning.model.chat import ChatFormatter
from prism_lightning.model.generation import DecodingConfig, generate_batch
from prism_lightning.training.teacher_cache import build_teacher_cache
from prism_lightning.utils.jsonl import JsonlSink

ROOT = Path(__file__).resolve().parents[1]
HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM (scripts/install-vllm.sh)")
PROMPTS = ["What is the capital of France?", "Write a short poem about the ocean at night.",
           "How do I reverse a list in Python?", "Why is the sky blue?", "Give me a simple recipe for pancakes.",
           "What is 17 multiplied by 23, and how do you compute it?", "What causes the seasons on Earth?",
           "Explain what a black hole is to a ten-year-old."]


@pytest.mark.skipif(HAS_VLLM, reason="checks the refusal where vLLM is missing")
@pytest.mark.parametrize("setting", ["data.engine", "data.scoring_engine"])
def test_the_vllm_engine_without_vllm_is_one_line(tmp_path, setting):
    out = subprocess.run([sys.executable, "-m", "prism_lightning.cli", "bootstrap", "--config",
                          str(ROOT / "configs" / "quickstart.yaml"), f"--{setting}", "vllm",
                          "--trainer.default_root_dir", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()
    assert len([line for line in last if line.startswith("error:")]) == 1
    assert last[-1] == (f"error: {setting}: vllm is not installed in this environment; scripts/install-vllm.sh "
                        "builds an environment with it (.venv-vllm)")
    assert not (tmp_path / "run" / "corpus" / "stages").exists() or not any(
        (tmp_path / "run" / "corpus" / "stages").iterdir())


@pytest.fixture(scope="module")
def engine():
    from prism_lightning.model.vllm_engine import VllmEngine

    backbone = load_backbone(BackboneConfig())
    started = VllmEngine(backbone, BackboneConfig(), kv_cache_gib=1.0)
    yield started
    started.close()


@pytest.fixture(scope="module")
def answers(engine):
    """Greedy HF answers to PROMPTS (40 tokens): what the judge tests compare."""
    formatter = ChatFormatter(engine.backbone.tokenizer)
    return [generate_batch(engine.backbone, [formatter.prompt_ids(p)], DecodingConfig(max_new_tokens=40))[0]["text"]
            for p in PROMPTS]


@needs_vllm
def test_greedy_texts_equal_the_hugging_face_path(engine):
    backbone = engine.backbone
    formatter = ChatFormatter(backbone.tokenizer)
    prompts = [formatter.prompt_ids(p) for p in PROMPTS]
    decoding = DecodingConfig(max_new_tokens=48)
    hf = [generate_batch(backbone, [p], decoding)[0] for p in prompts]  # one per call: no padding
    got = engine.generate(prompts, decoding, seeds=[0] * len(prompts))
    assert [g["text"] for g in got] == [h["text"] for h in hf]
    assert [(g["new_tokens"], g["finished"]) for g in got] == [(h["new_tokens"], h["finished"]) for h in hf]


@needs_vllm
def test_a_sampled_item_draws_from_its_own_seed_whatever_its_batch(engine):
    formatter = ChatFormatter(engine.backbone.tokenizer)
    prompts = [formatter.prompt_ids(p) for p in PROMPTS[:4]]
    decoding = DecodingConfig(max_new_tokens=24, temperature=0.9)
    seeds = [11, 12, 13, 14]
    first = [r["text"] for r in engine.generate(prompts, decoding, seeds)]
    reversed_order = [r["text"] for r in engine.generate(prompts[::-1], decoding, seeds[::-1])][::-1]
    alone = engine.generate(prompts[2:3], decoding, seeds[2:3])[0]["text"]
    assert first == reversed_order and alone == first[2]
    assert engine.generate(prompts[:1], decoding, [99])[0]["text"] != first[0]  # the seed matters


@needs_vllm
def test_quickstart_bootstrap_and_teacher_cache_on_vllm_keep_the_schema_and_name_the_engine(tmp_path):
    overlay = tmp_path / "small.yaml"
    overlay.write_text(json.dumps({"data": {
        "personas": {"names": ["math", "writing"], "granularity": "half"},
        "queries": {"per_persona": 3, "decoding": {"temperature": 0.9, "max_new_tokens": 32, "seed": 1,
                                                   "batch_size": 16}},
        "answers": {"decoding": {"temperature": 0.7, "max_new_tokens": 24, "seed": 2, "batch_size": 16}},
        "judge": {"control_pairs": 4, "batch_size": 8, "max_answer_tokens": 48}}}))
    runs = {}
    for engine_name in ("hf", "vllm"):
        root = tmp_path / engine_name
        out = subprocess.run([sys.executable, "-m", "prism_lightning.cli", "bootstrap", "--config",
                              str(ROOT / "configs" / "quickstart.yaml"), "--config", str(overlay), "--data.engine",
                              engine_name, "--trainer.default_root_dir", str(root)],
                             capture_output=True, text=True, timeout=1200, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        runs[engine_name] = {p.name.split("-")[0] + ("-" + p.name.split("-")[1] if p.name.startswith("judge_") else ""):
                             p for p in (root / "corpus" / "stages").glob("*.jsonl")}
    # A rerun finds every stage done: the vLLM engine is never started (it would hold its memory for nothing).
    again = subprocess.run([sys.executable, "-m", "prism_lightning.cli", "bootstrap", "--config",
                            str(ROOT / "configs" / "quickstart.yaml"), "--config", str(overlay), "--data.engine", "vllm",
                            "--trainer.default_root_dir", str(tmp_path / "vllm")],
                           capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Loading safetensors checkpoint shards" not in again.stdout + again.stderr
    hf, vllm = runs["hf"], runs["vllm"]
    assert json.loads((tmp_path / "vllm" / "corpus" / "manifest.json").read_text())["engine"] == "vllm"
    assert "engine" not in json.loads((tmp_path / "hf" / "corpus" / "manifest.json").read_text())
    assert set(hf) == set(vllm) >= {"queries", "answers", "judge"}
    assert all(hf[k].name != vllm[k].name for k in hf)  # the engine is part of every stage's hash
    for stage in ("queries", "answers", "judge"):
        keys = {tuple(sorted(json.loads(line))) for line in vllm[stage].read_text().splitlines()}
        assert keys == {tuple(sorted(json.loads(line))) for line in hf[stage].read_text().splitlines()}
    # The same answers judged on HF (data.scoring_engine hf): stages 1-2 are reused, the judge gets its own file,
    # and every label equals the one the vLLM judge gave.
    corpus = tmp_path / "vllm" / "corpus"
    labels_vllm = [(i["id"], i["label"]) for i in map(json.loads, (corpus / "corpus.jsonl").read_text().splitlines())]
    mixed = subprocess.run([sys.executable, "-m", "prism_lightning.cli", "bootstrap", "--config",
                            str(ROOT / "configs" / "quickstart.yaml"), "--config", str(overlay), "--data.engine", "vllm",
                            "--data.scoring_engine", "hf", "--trainer.default_root_dir", str(tmp_path / "vllm")],
                           capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert mixed.returncode == 0, mixed.stderr[-3000:]
    assert "Loading safetensors checkpoint shards" not in mixed.stdout + mixed.stderr  # nothing ran on vLLM
    assert len(list((corpus / "stages").glob("judge-*.jsonl"))) == 2
    assert len(list((corpus / "stages").glob("answers-*.jsonl"))) == 1
    labels_hf = [(i["id"], i["label"]) for i in map(json.loads, (corpus / "corpus.jsonl").read_text().splitlines())]
    assert labels_hf == labels_vllm
    assert json.loads((corpus / "manifest.json").read_text())["scoring_engine"] == "hf"
    # The README's `prism fit` line (vLLM corpus, teacher cache built by vLLM, then HF trains), on the overlay for
    # 2 steps, its root moved under tmp_path (a later --trainer.default_root_dir wins).
    fit_args = readme_vllm_args("fit")
    fit_args[fit_args.index("configs/quickstart.yaml")] = str(ROOT / "configs" / "quickstart.yaml")
    fit = subprocess.run([sys.executable, "-m", "prism_lightning.cli", "fit", *fit_args, "--config", str(overlay),
                          "--trainer.max_steps", "2", "--trainer.callbacks.init_args.n", "8",
                          "--trainer.default_root_dir", str(tmp_path / "vllm")],
                         capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "Loading safetensors checkpoint shards" in fit.stdout + fit.stderr  # the cache ran on vLLM
    teacher = list((tmp_path / "vllm" / "corpus" / "stages").glob("teacher-*.jsonl"))
    distill = [json.loads(line) for line in (tmp_path / "vllm" / "corpus" / "corpus.jsonl").read_text().splitlines()]
    assert len(teacher) == 1
    assert len(teacher[0].read_text().splitlines()) == sum(item["label"] == 1 for item in distill)
    assert (tmp_path / "vllm" / "export" / "prism.json").is_file()
    check_readme_serve_command(tmp_path / "vllm" / "export")


def readme_vllm_args(command: str) -> list[str]:
    """The arguments of the `.venv-vllm/bin/prism <command>` line of the README's vLLM section, as written."""
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## The vLLM engine", 1)[1].split("\n## ", 1)[0]
    words = next(line.split() for line in section.splitlines() if line.startswith(f".venv-vllm/bin/prism {command} "))
    return words[2:]


def check_readme_serve_command(export: Path) -> None:
    """The README's `prism serve --engine vllm` line on a trained export of the embedded model: each reply equals
    GatedModel's on the route the gate took (the same text, route and probability)."""
    from test_serve import Server

    from prism_lightning.inference.gated_model import GatedModel

    args = readme_vllm_args("serve")
    del args[args.index("--export"):args.index("--export") + 2]
    server = Server(export, *args)
    try:
        gated = GatedModel.from_pretrained(export, device="cpu")
        client = server.client()
        for prompt in PROMPTS[:3]:
            reply = client.chat.completions.create(model="prism", messages=[{"role": "user", "content": prompt}],
                                                   max_tokens=24)
            expected = gated.generate_ids([gated.prompt_ids(prompt)], DecodingConfig(max_new_tokens=24))[0]
            assert reply.choices[0].message.content.strip() == expected["text"], prompt
            assert reply.model_extra["prism"]["route"] == expected["route"]
            assert reply.model_extra["prism"]["probability"] == expected["probability"]
        adapter = client.chat.completions.create(model="prism:adapter", max_tokens=24,
                                                 messages=[{"role": "user", "content": PROMPTS[0]}])
        forced = gated.generate_ids([gated.prompt_ids(PROMPTS[0])], DecodingConfig(max_new_tokens=24), "adapter")[0]
        assert adapter.choices[0].message.content.strip() == forced["text"]
    finally:
        server.stop()


# Stated tolerances (float32 on CPU; HF runs left-padded batches, vLLM its own kernels): per stored log-prob, per
# summed answer log-likelihood (40-odd tokens), per teacher logit.
LOGPROB_ATOL, SUM_ATOL, LOGIT_ATOL = 1e-3, 1e-2, 1e-3


@needs_vllm
def test_judge_scores_and_verdicts_equal_the_hugging_face_path(engine, answers, tmp_path):
    n = len(PROMPTS)
    # Each query against its own answer and against the next query's (a relevance control): both outcomes occur.
    comparisons = [Comparison(f"q{i}/{side}", PROMPTS[i], f"q{i}", f"q{(i + 1) % n}", answers[i], answers[(i + 1) % n])
                   if side == "own" else
                   Comparison(f"q{i}/{side}", PROMPTS[i], f"q{(i + 1) % n}", f"q{i}", answers[(i + 1) % n], answers[i])
                   for i in range(n) for side in ("own", "other")]
    config = JudgeConfig(batch_size=4, max_answer_tokens=48)
    scores: dict[str, dict[str, dict]] = {}
    for kind in ("pairwise", "pointwise", "likelihood"):
        items = scoring_items(kind, comparisons)
        for name, scorer in (("hf", None), ("vllm", engine)):
            sink = JsonlSink(tmp_path / f"{kind}-{name}.jsonl")
            Judge(engine.backbone, config, scorer).score(kind, items, sink)
            scores.setdefault(kind, {})[name] = {r["id"]: r for r in sink.records()}
        hf, vllm = scores[kind]["hf"], scores[kind]["vllm"]
        assert set(hf) == set(vllm) == {i["id"] for i in items}
        for key in hf:
            for field, value in hf[key].items():
                if field == "id":
                    continue
                got = torch.tensor(vllm[key][field], dtype=torch.float64)
                atol = SUM_ATOL if field in ("cond", "uncond") else LOGPROB_ATOL
                assert torch.allclose(got, torch.tensor(value, dtype=torch.float64), atol=atol), (kind, key, field)
    for protocol in PROTOCOLS:
        by_engine = {name: decide(protocol, comparisons, scores[SCORER[protocol]][name], config)
                     for name in ("hf", "vllm")}
        assert torch.equal(by_engine["hf"].label, by_engine["vllm"].label), protocol
        assert 0 < int(by_engine["hf"].label.sum()) < len(comparisons) or protocol == "strict"


@needs_vllm
def test_teacher_top_k_cache_equals_the_hugging_face_cache(engine, answers, tmp_path):
    from prism_lightning.model.vllm_engine import VllmEngine

    backbone = engine.backbone
    formatter = ChatFormatter(backbone.tokenizer)
    persona = "You are a patient teacher who explains every step."
    encoded = []
    for i, (question, answer) in enumerate(zip(PROMPTS, answers)):
        teacher = formatter.encode(question, answer, persona)
        encoded.append({"id": f"q{i}", "teacher": teacher.input_ids, "t_start": teacher.prompt_len,
                        "n_resp": len(teacher.input_ids) - teacher.prompt_len})
    hf = build_teacher_cache(backbone, encoded, 64, tmp_path, batch_size=3)
    logits_engine = VllmEngine(backbone, BackboneConfig(), kv_cache_gib=1.0, values="logits")
    try:
        vllm = build_teacher_cache(backbone, encoded, 64, tmp_path, batch_size=3, engine=logits_engine)
    finally:
        logits_engine.close()
    assert hf.path != vllm.path and set(hf.records) == set(vllm.records)  # the engine names its own stage file
    positions = agree = 0
    for key in hf.records:
        hv, hi = hf.targets(key)
        vv, vi = vllm.targets(key)
        assert hv.shape == vv.shape and hv.shape[1] == 64
        assert torch.allclose(vv, hv, atol=LOGIT_ATOL)  # both sorted: the k largest logits, rank by rank
        # The same vocabulary ids, up to ties inside the tolerance (an id pair may swap ranks).
        same = hi == vi
        assert bool(((vv - hv).abs() <= LOGIT_ATOL)[~same].all())
        positions += same.numel()
        agree += int(same.sum())
    assert agree / positions > 0.99
