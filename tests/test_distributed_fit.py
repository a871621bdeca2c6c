"""`prism fit` on two real processes (gloo on CPU; NCCL in the GPU-marked variants): DDP, ZeRO-2, ZeRO-3.

Tiny random Llama (hidden 64, 3 layers) with the real SmolLM2 tokenizer, 12 hand-made corpus items: 9 train (5 draws
per rank), 3 held out (rank 1's share is padded with a repeat, which the gathered gate outputs must drop).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dist_helpers import prism_env, route_export, run_prism, trainable_only
from safetensors.torch import load_file
from test_cli_fit import fit_config, save_tiny_model, train_losses, write_corpus

from prism_lightning.cli import main

LABELS = [1, 0, 0] * 4  # 4 distill / 8 retain; held out: 1 + 2
N_HELD_OUT = 3
CALLBACKS = [{"class_path": "prism_lightning.training.callbacks.gate_calibration.GateCalibration"},
             {"class_path": "prism_lightning.training.callbacks.routing_report.RoutingReport"}]
# MMLU base vs gated: under DDP each rank scores half the items; under ZeRO-3 (collective forwards) all of them.
DISC = {"class_path": "prism_lightning.training.callbacks.discriminative_check.DiscriminativeAccuracyCheck",
        "init_args": {"n": 4, "every_n_epochs": 1, "tolerance": 100.0}}
# LoRA dropout on: each rank's generator runs its own course (mask sizes follow its batches), so an exact resume
# needs every rank's random state back, not rank 0's on all of them.
DROPOUT = ["--model.init_args.lora.dropout", "0.1"]
GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def tiny_model(smol_tokenizer, tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", smol_tokenizer, seed=0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus", LABELS)


def config(tmp: Path, model: Path, corpus: Path, epochs: int, *callbacks: dict) -> Path:
    """The tiny fit config of test_cli_fit plus the calibration and routing callbacks."""
    return fit_config(tmp, model, corpus, epochs=epochs, extra_callbacks=[*CALLBACKS, *callbacks])


def distributed(strategy: str, accelerator: str = "cpu") -> list[str]:
    devices = 2 if accelerator == "cpu" else min(2, torch.cuda.device_count())
    return ["--trainer.accelerator", accelerator, "--trainer.devices", str(devices), "--trainer.strategy", strategy]


def logged_epochs(tmp: Path) -> set[int]:
    return {int(r["epoch"]) for r in csv.DictReader((tmp / "logs" / "metrics.csv").open()) if r.get("epoch")}


def probe(path: Path) -> dict:
    return {"class_path": "dist_helpers.GateProbe", "init_args": {"path": str(path)}}


# --------------------------------------------------------------------------- DDP
@pytest.fixture(scope="module")
def ddp_straight(tiny_model, corpus, tmp_path_factory) -> Path:
    """An uninterrupted 3-epoch DDP fit on 2 processes."""
    tmp = tmp_path_factory.mktemp("ddp")
    run_prism("fit", "--config", str(config(tmp, tiny_model, corpus, 3, probe(tmp / "probe.json"), DISC)),
              *distributed("ddp"), *DROPOUT)
    return tmp


def test_ddp_fit_calibrates_on_the_whole_split_and_exports(ddp_straight):
    run = ddp_straight / "run"
    calibration = json.loads((run / "calibration" / "calibration.json").read_text())
    assert calibration["n"] == N_HELD_OUT  # both ranks' shares, the padding repeat dropped
    routing = json.loads((run / "routing" / "epoch2.json").read_text())
    assert sum(routing["n"][p] for p in ("math", "writing")) == N_HELD_OUT
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert trainable_only(saved["state_dict"]) and saved["optimizer_states"]
    probed = json.loads((ddp_straight / "probe.json").read_text())
    assert probed["world_size"] == 2
    rows = list(csv.DictReader((ddp_straight / "logs" / "metrics.csv").open()))
    accuracies = [float(r["disc/base_acc"]) for r in rows if r.get("disc/base_acc")]
    assert len(accuracies) == 3 and all(a in (0.0, 25.0, 50.0, 75.0, 100.0) for a in accuracies)  # 4 items pooled
    assert route_export(run / "export") == pytest.approx(probed["probabilities"], abs=1e-6)


def test_a_ddp_fit_killed_after_an_epoch_resumes_with_the_same_draws(ddp_straight, tiny_model, corpus, tmp_path):
    """SIGKILL to every rank (a lost node) after epoch 0's checkpoint; `--ckpt_path last` redoes the rest exactly."""
    pause = {"class_path": "conftest.PauseAfterFirstEpoch", "init_args": {"seconds": 30}}
    cfg = config(tmp_path, tiny_model, corpus, 3, pause)
    proc = subprocess.Popen([sys.executable, "-m", "prism_lightning.cli", "fit", "--config", str(cfg),
                             *distributed("ddp"), *DROPOUT], env=prism_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.is_file():
        assert proc.poll() is None, f"fit ended early: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "no checkpoint after 300 s"
        time.sleep(0.1)
    time.sleep(1.0)  # inside the pause: epoch 0 is checkpointed, epoch 1 has not started
    os.killpg(proc.pid, signal.SIGKILL)  # rank 0 and the rank it launched
    proc.wait(timeout=60)
    saved = torch.load(last, weights_only=True, map_location="cpu")
    assert saved["epoch"] == 0
    ranks = saved["prism_rng"]["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])
    first_leg = train_losses(tmp_path)
    run_prism("fit", "--config", str(config(tmp_path, tiny_model, corpus, 3)), *distributed("ddp"), *DROPOUT,
              "--ckpt_path", "last")
    resumed, expected = {**first_leg, **train_losses(tmp_path)}, train_losses(ddp_straight)
    assert set(resumed) == set(expected) and len(expected) >= 9
    for step, loss in expected.items():
        assert resumed[step] == pytest.approx(loss, abs=1e-5), step
    # The losses barely feel the masks on a tiny model; the trained weights do.
    final = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu")["state_dict"]
    reference = torch.load(ddp_straight / "run" / "checkpoints" / "last.ckpt", map_location="cpu")["state_dict"]
    assert final.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(final[name], tensor, rtol=1e-5, atol=1e-8, msg=name)


# --------------------------------------------------------------------------- DeepSpeed ZeRO-2 / ZeRO-3
def zero_case(stage: int, accelerator: str):
    marks = GPU if accelerator == "gpu" else []
    return pytest.param(stage, accelerator, marks=marks, id=f"zero{stage}-{accelerator}")


@pytest.mark.parametrize("stage, accelerator", [zero_case(2, "cpu"), zero_case(3, "cpu"), zero_case(2, "gpu"),
                                                zero_case(3, "gpu")])
def test_zero_fit_exports_resumes_and_checks_its_checkpoint(stage, accelerator, tiny_model, corpus, tmp_path,
                                                            capsys):
    """Fit (callbacks that forward on every rank included), then: the checkpoint directory holds no frozen weight;
    `prism export` from it, loaded by GatedModel in a fresh process, routes exactly as the trained module did; the
    fit resumes from it for one more epoch; a copy missing one rank's shard is one line naming the file."""
    strategy = f"deepspeed_stage_{stage}"
    # Under ZeRO-3 each of its forwards is a collective: it must run on every rank, in step.
    disc = [DISC] if stage == 3 else []
    cfg = config(tmp_path, tiny_model, corpus, 2, probe(tmp_path / "probe.json"), *disc)
    cpu = accelerator == "cpu"
    run_prism("fit", "--config", str(cfg), *distributed(strategy, accelerator), cpu=cpu)
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_dir() and sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]
    for states in (last / "checkpoint").glob("*model_states.pt"):
        assert trainable_only(torch.load(states, weights_only=True, map_location="cpu")["module"]), states.name
    exported = tmp_path / "from-checkpoint"
    run_prism("export", "--config", str(cfg), "--ckpt_path", "last", "--export_dir", str(exported))
    probed = json.loads((tmp_path / "probe.json").read_text())["probabilities"]
    assert route_export(exported) == pytest.approx(probed, abs=1e-6 if cpu else 1e-4)  # GPU-trained, CPU-routed
    for name in ("gate.safetensors", "adapter/adapter_model.safetensors"):  # the fit's own export: the same weights
        ours, theirs = load_file(exported / name), load_file(run / "export" / name)
        assert ours.keys() == theirs.keys() and all(torch.allclose(ours[k], theirs[k], atol=1e-7) for k in ours)

    run_prism("fit", "--config", str(config(tmp_path, tiny_model, corpus, 3)), *distributed(strategy, accelerator),
              "--ckpt_path", "last", cpu=cpu)
    assert logged_epochs(tmp_path) == {2}  # resumed after epoch 1, not from the start

    broken = tmp_path / "broken.ckpt"
    shutil.copytree(last, broken)
    shard = sorted((broken / "checkpoint").glob("*zero_pp_rank_*_optim_states.pt"))[-1]  # the last rank's
    shard.unlink()
    with pytest.raises(SystemExit) as done:
        main(["export", "--config", str(cfg), "--ckpt_path", str(broken)])
    assert done.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: ") and "incomplete DeepSpeed checkpoint" in line
    assert f"checkpoint/{shard.name}" in line


# --------------------------------------------------------------------------- the real embedded model
@pytest.mark.slow
def test_quickstart_on_two_processes_under_zero2_exports_a_loadable_artifact(tmp_path):
    """`prism fit --config configs/quickstart.yaml` on SmolLM2-135M, 2 CPU processes, ZeRO-2, a small written corpus."""
    from test_cli_fit import ROOT

    corpus = write_corpus(tmp_path / "corpus", [1, 0] * 6)
    run = tmp_path / "run"
    run_prism("fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), *distributed("deepspeed_stage_2"),
              "--trainer.default_root_dir", str(run), "--trainer.max_epochs", "1", "--data.bootstrap", "false",
              "--data.corpus_dir", str(corpus), "--data.personas.names", "[math, writing]",
              "--data.personas.granularity", "min", "--trainer.callbacks.init_args.n", "8", timeout=1500)
    for states in (run / "checkpoints" / "last.ckpt" / "checkpoint").glob("*model_states.pt"):
        assert trainable_only(torch.load(states, weights_only=True, map_location="cpu")["module"]), states.name
    code = ("import json, sys; from prism_lightning import GatedModel; from prism_lightning.model.generation import "
            "DecodingConfig; m = GatedModel.from_pretrained(sys.argv[1], device='cpu'); "
            "print(json.dumps(m.generate(['What is 17 * 23?', 'Write a haiku about rain.'], "
            "DecodingConfig(max_new_tokens=8))))")
    out = subprocess.run([sys.executable, "-c", code, str(run / "export")], capture_output=True, text=True,
                         env=prism_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(rows) == 2 and all(r["route"] in ("adapter", "base") and r["text"] for r in rows)


def test_ddp_predict_merges_the_ranks_shares_in_prompt_order(ddp_straight, tiny_model, corpus, tmp_path):
    """Two ranks predict alternate prompts into files of their own; rank 0 merges them in the prompt file's order."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{k}", "prompt": f"Question {k}?"}) + "\n" for k in range(5)))
    run_prism("predict", "--config", str(config(ddp_straight, tiny_model, corpus, 3)), *distributed("ddp"),
              "--ckpt_path", "last", "--data.predict_file", str(prompts), "--model.init_args.predict_decoding",
              '{"max_new_tokens": 4}')
    out = ddp_straight / "run" / "predictions.jsonl"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"p{k}" for k in range(5)]
    assert all(set(r) >= {"prompt", "text", "route", "probability"} and "_index" not in r for r in rows)
    assert sorted(p.name for p in out.parent.iterdir() if "partial" in p.name) == []
