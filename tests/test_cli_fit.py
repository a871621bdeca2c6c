"""`prism fit | validate | export | --print_config` through the real CLI on a tiny model saved as a local directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from prism_lightning.cli import main
from prism_lightning.contexts.personas import PersonaConfig, PersonaRegistry

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "configs" / "models").glob("*.yaml"))
STRATEGIES = sorted((ROOT / "configs" / "strategy").glob("*.yaml"))


def save_tiny_model(path: Path, tokenizer, seed: int, hidden_size: int = 64, heads: int = 4) -> Path:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=3, num_attention_heads=heads, num_key_value_heads=heads // 2,
                         tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_model(smol_tokenizer, tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", smol_tokenizer, seed=0)


def write_corpus(directory: Path, labels: list[int]) -> Path:
    """A hand-made corpus (what stages 1-3 would write), so fit tests do not depend on generation."""
    directory.mkdir(parents=True, exist_ok=True)
    personas = {p.name: p.text for p in PersonaRegistry.from_config(PersonaConfig(names=["math", "writing"],
                                                                                 granularity="min"))}
    items = []
    for n, label in enumerate(labels):
        persona = ["math", "writing"][n % 2]
        items.append({"id": f"{persona}-{n:04d}", "persona": persona, "target_persona": persona, "label": label,
                      "margin": 0.1 if label else -0.1, "query": f"Question number {n}: how does item {n} work?",
                      "persona_answer": f"A careful expert answer about item {n}, step by step.",
                      "baseline_answer": f"Item {n} works fine."})
    (directory / "corpus.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (directory / "manifest.json").write_text(json.dumps({"personas": personas, "counts": {
        "queries": len(items), "distill": sum(labels), "retain": len(labels) - sum(labels)}}))
    return directory


def fit_config(tmp: Path, model_dir: Path, corpus: Path, epochs: int = 2, extra_callbacks=()) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "default_root_dir": str(tmp / "run"), "max_epochs": epochs, "accelerator": "cpu", "devices": 1,
            "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(tmp / "logs"), "name": "", "version": ""}},
            # No dirpath: the CLI puts checkpoints under default_root_dir (tests rely on <root>/checkpoints).
            "callbacks": [{"class_path": "prism_lightning.training.callbacks.run_checkpoint.RunCheckpoint"},
                          *extra_callbacks],
        },
        "model": {"class_path": "prism_lightning.training.modules.PrismModule",
                  "init_args": {"lora": {"rank": 4, "alpha": 8, "dropout": 0.0}, "lr": 1e-3, "top_k": 16}},
        "data": {"backbone": {"name_or_path": str(model_dir)},
                 "personas": {"names": ["math", "writing"], "granularity": "min"},
                 "corpus_dir": str(corpus), "bootstrap": False, "batch_size": 2, "max_length": 128,
                 "val_fraction": 0.25},
    }
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train_losses(tmp: Path) -> dict[int, float]:
    import csv

    rows = list(csv.DictReader((tmp / "logs" / "metrics.csv").open()))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_print_config_round_trips(config, tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(config), "--print_config"])
    assert done.value.code in (0, None)
    first = capsys.readouterr().out
    saved = tmp_path / "printed.yaml"
    saved.write_text(first)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(saved), "--print_config"])
    assert capsys.readouterr().out == first
    assert yaml.safe_load(first)["model"]["class_path"] == "prism_lightning.training.modules.PrismModule"


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda p: p.name)
def test_strategy_fragments_compose(strategy, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--config", str(strategy),
              "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["strategy"] == yaml.safe_load(strategy.read_text())["trainer"]["strategy"]


def test_full_benchmark_fragment_composes(capsys):
    """configs/benchmark/full.yaml on top of a run config: the shipped benchmark files, MMLU n = 1000, bfloat16."""
    with pytest.raises(SystemExit):
        main(["test", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--config",
              str(ROOT / "configs" / "benchmark" / "full.yaml"), "--print_config"])
    data = yaml.safe_load(capsys.readouterr().out)["data"]
    assert data["backbone"]["dtype"] == "bfloat16" and data["benchmark"]["mmlu_n"] == 1000
    assert data["benchmark"]["mt_bench"] == "builtin:mt_bench" and data["benchmark"]["harmbench"] == "builtin:harmbench"
    assert data["benchmark"]["prompt_sets"] == {"jailbreak": "builtin:jailbreak"}
    assert data["personas"]["names"] == ["all"]  # the run config's keys survive the merge


def test_fit_exports_and_user_callback_fires(tiny_model, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", [1, 0] * 6)
    hooks = tmp_path / "hooks.json"
    recorder = {"class_path": "prism_lightning.training.callbacks.example.HookRecorder", "init_args": {"path": str(hooks)}}
    main(["fit", "--config", str(fit_config(tmp_path, tiny_model, corpus, extra_callbacks=[recorder]))])
    fired = [e["hook"] for e in json.loads(hooks.read_text())]
    assert fired[0] == "on_fit_start" and fired[-1] == "on_fit_end"
    assert fired.count("on_train_epoch_end") == 2 and "on_validation_end" in fired
    export = tmp_path / "run" / "export"
    for name in ("prism.json", "gate.safetensors", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (export / name).is_file(), name
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert all("lora_" in k or k.startswith("gate.") for k in ckpt["state_dict"]), "frozen base in checkpoint"
    assert ckpt["optimizer_states"] and ckpt["prism_base_model"]["fingerprint"]
    # A fresh process loads the export with GatedModel, no Lightning, and generates with routing.
    code = ("import json,sys; from prism_lightning import GatedModel; from prism_lightning.model.generation import "
            "DecodingConfig; m = GatedModel.from_pretrained(sys.argv[1]); "
            "rows = m.generate(['hello there', 'what is two plus two?'], DecodingConfig(max_new_tokens=4)); "
            "loaded = sorted(n for n in sys.modules if n.split('.')[0] in ('lightning', 'pytorch_lightning')); "
            "print(json.dumps({'rows': rows, 'lightning': loaded}))")
    out = subprocess.run([sys.executable, "-c", code, str(export)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    rows = result["rows"]
    assert len(rows) == 2 and all(r["route"] in ("adapter", "base") and 0 <= r["probability"] <= 1 for r in rows)
    assert result["lightning"] == [], "inference imported Lightning"


def _logged(path: Path, key: str) -> list[float]:
    import csv

    return [float(r[key]) for r in csv.DictReader(path.open()) if r.get(key)]


def test_fit_measures_the_held_out_kl_before_the_first_step_as_validation_does(tiny_model, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", [1, 0] * 6)
    config = fit_config(tmp_path / "fit", tiny_model, corpus)
    main(["fit", "--config", str(config)])
    out = capsys.readouterr().out
    kl_init = _logged(tmp_path / "fit" / "logs" / "metrics.csv", "val/kl_init")
    assert len(kl_init) == 1 and kl_init[0] > 0
    # `prism validate` without a checkpoint validates the untrained module: the same number, measured by Lightning.
    fresh = fit_config(tmp_path / "validate", tiny_model, corpus)
    main(["validate", "--config", str(fresh)])
    assert _logged(tmp_path / "validate" / "logs" / "metrics.csv", "val/kl") == pytest.approx(kl_init, rel=1e-5)
    final = _logged(tmp_path / "fit" / "logs" / "metrics.csv", "val/kl")[-1]
    change = (final - kl_init[0]) / kl_init[0]
    assert f"Distillation: held-out KL(teacher ‖ student) after 2 epochs {final:.4f} ({change:+.1%} from " \
           f"{kl_init[0]:.4f} at initialisation)" in " ".join(out.split())
    ckpt = torch.load(tmp_path / "fit" / "run" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["prism_kl_at_init"] == pytest.approx(kl_init[0])


def test_interrupted_and_resumed_fit_matches_uninterrupted(tiny_model, tmp_path):
    """Tolerance 1e-5 on every logged training loss (dropout 0; the sampler is seeded per epoch)."""
    corpus = write_corpus(tmp_path / "corpus", [1, 0, 0] * 4)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    main(["fit", "--config", str(fit_config(straight, tiny_model, corpus, epochs=3))])
    stop = {"class_path": "conftest.StopAfterEpoch", "init_args": {"epochs": 1}}
    main(["fit", "--config", str(fit_config(interrupted, tiny_model, corpus, epochs=3, extra_callbacks=[stop]))])
    first_leg = train_losses(interrupted)
    assert 0 < len(first_leg) < 9
    main(["fit", "--config", str(fit_config(interrupted, tiny_model, corpus, epochs=3)), "--ckpt_path", "last"])
    resumed = {**first_leg, **train_losses(interrupted)}
    expected = train_losses(straight)
    assert len(expected) >= 9 and set(resumed) == set(expected)
    for step, loss in expected.items():
        assert resumed[step] == pytest.approx(loss, abs=1e-5), step
    # The resumed leg keeps the first leg's initial KL (from the checkpoint) and does not measure it again.
    assert _logged(interrupted / "logs" / "metrics.csv", "val/kl_init") == []  # the resumed leg's log
    kl_init = [torch.load(run / "run" / "checkpoints" / "last.ckpt", weights_only=True)["prism_kl_at_init"]
               for run in (straight, interrupted)]
    assert kl_init[0] == pytest.approx(kl_init[1])


def test_one_class_corpus_names_the_knob(tiny_model, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", [1] * 8)
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(fit_config(tmp_path, tiny_model, corpus))])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "retain (label 0) set is empty" in err and "data.judge.margin" in err


def test_checkpoint_for_another_base_model_is_refused(tiny_model, smol_tokenizer, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", [1, 0] * 4)
    main(["fit", "--config", str(fit_config(tmp_path, tiny_model, corpus, epochs=1))])
    other = save_tiny_model(tmp_path / "other", smol_tokenizer, seed=1)
    with pytest.raises(SystemExit) as done:
        main(["validate", "--config", str(fit_config(tmp_path, tiny_model, corpus)),
              "--data.backbone.name_or_path", str(other), "--ckpt_path", "last"])
    assert done.value.code == 2
    assert "made for base model" in capsys.readouterr().err


def test_a_diverging_run_stops_naming_the_step_and_exports_nothing(tiny_model, tmp_path, capsys):
    """Issue #9: `--model.init_args.lr 1e10` used to train, exit 0 and export adapter weights of ~1e18."""
    corpus = write_corpus(tmp_path / "corpus", [1, 0] * 4)
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(fit_config(tmp_path, tiny_model, corpus, epochs=1)), "--model.init_args.lr",
              "1e10", "--model.init_args.warmup_ratio", "0"])
    assert done.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: training diverged at global step ") and "model.init_args.lr" in last
    assert not (tmp_path / "run" / "export").exists()


def _mmlu_base_gets_right(directory: Path, model_dir: Path) -> Path:
    """A cais-style MMLU directory whose answers are the untouched base model's predictions (base accuracy 100 %)."""
    import csv

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prism_lightning.evaluation import mmlu
    from prism_lightning.model.chat import ChatFormatter
    from prism_lightning.model.generation import token_logprobs

    # A fresh load, not the process's backbone cache: an earlier fit in this process left its LoRA layers there.
    backbone = SimpleNamespace(model=AutoModelForCausalLM.from_pretrained(model_dir).eval(),
                               tokenizer=AutoTokenizer.from_pretrained(model_dir), device=torch.device("cpu"))
    rows = [{"question": f"Question {i}: which option fits case {i}?", "subject": s,
             "choices": [f"a{i}", f"b{i}", f"c{i}", f"d{i}"]}
            for i, s in enumerate(["college physics", "philosophy", "sociology", "virology"] * 5)]
    formatter = ChatFormatter(backbone.tokenizer)
    ids = [formatter.prompt_ids(mmlu.prompt_text(r)) for r in rows]
    def logprobs(batch, tokens, tail):
        return token_logprobs(backbone.model, backbone.tokenizer.pad_token_id, backbone.device, batch, tokens, tail)

    predicted = mmlu.letter_reader(formatter).read(logprobs, ids).logprobs.argmax(-1)
    (directory / "test").mkdir(parents=True)
    for subject in {r["subject"] for r in rows}:
        with (directory / "test" / f"{subject.replace(' ', '_')}_test.csv").open("w", newline="") as fh:
            csv.writer(fh).writerows([[r["question"], *r["choices"], "ABCD"[int(p)]]
                                      for r, p in zip(rows, predicted) if r["subject"] == subject])
    return directory


def test_discriminative_check_stops_prism_fit_when_the_adapter_destroys_accuracy(tiny_model, tmp_path):
    """Through `prism fit`: a 3-epoch run whose adapter is broken before the first validation ends after epoch 0."""
    import csv

    corpus = write_corpus(tmp_path / "corpus", [1, 0] * 6)
    source = _mmlu_base_gets_right(tmp_path / "mmlu", tiny_model)
    callbacks = [{"class_path": "conftest.DestroyAdapter"},
                 {"class_path": "prism_lightning.training.callbacks.discriminative_check.DiscriminativeAccuracyCheck",
                  "init_args": {"mmlu_source": str(source), "n": 20, "tolerance": 5.0, "mode": "stop"}}]
    main(["fit", "--config", str(fit_config(tmp_path, tiny_model, corpus, epochs=3, extra_callbacks=callbacks))])
    rows = list(csv.DictReader((tmp_path / "logs" / "metrics.csv").open()))
    checks = [r for r in rows if r.get("disc/drop")]
    assert checks and float(checks[0]["disc/base_acc"]) == 100.0 and float(checks[0]["disc/drop"]) > 5.0
    assert max(int(r["epoch"]) for r in rows if r.get("epoch")) == 0, "the run went on past the failed check"
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()  # finished work is kept


def test_lightnings_throughput_monitor_counts_prism_batches(tiny_model, tmp_path):
    """The command line bench/gpu_check.sh uses: training tokens/s from Lightning's ThroughputMonitor."""
    import csv

    corpus = write_corpus(tmp_path / "corpus", [1, 0] * 6)
    main(["fit", "--config", str(fit_config(tmp_path, tiny_model, corpus, epochs=1)),
          "--trainer.callbacks+=lightning.pytorch.callbacks.ThroughputMonitor",
          "--trainer.callbacks.batch_size_fn=prism_lightning.training.throughput.batch_rows",
          "--trainer.callbacks.length_fn=prism_lightning.training.throughput.batch_tokens"])
    rows = [r for r in csv.DictReader((tmp_path / "logs" / "metrics.csv").open()) if r.get("train/lengths")]
    assert rows, "ThroughputMonitor logged nothing"
    last = rows[-1]
    # 12 items, 3 held out: 9 draws in batches of 2; the monitor's counts are cumulative over the logged batches.
    assert 6 <= float(last["train/samples"]) <= 10 and float(last["train/time"]) > 0
    assert float(last["train/lengths"]) > 20 * float(last["train/samples"])  # student + teacher tokens per item
