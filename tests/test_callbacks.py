"""Calibration math, GateCalibration, and DiscriminativeAccuracyCheck stopping a run whose adapter destroys accuracy."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest
import torch

from prism_lightning.evaluation import mmlu
from prism_lightning.training.calibration import expected_calibration_error, fit_temperature, select_threshold
from prism_lightning.training.callbacks.discriminative_check import DiscriminativeAccuracyCheck
from prism_lightning.training.callbacks.gate_calibration import GateCalibration
from prism_lightning.training.modules.gate import IntentGate


def miscalibrated(n: int = 4000, sharpness: float = 4.0, seed: int = 0):
    """Labels drawn from true probabilities; logits made overconfident by ``sharpness``."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(n, generator=g) * 0.9 + 0.05
    labels = (torch.rand(n, generator=g) < p).float()
    return sharpness * torch.logit(p), labels


def test_temperature_scaling_lowers_ece_of_an_overconfident_gate():
    logits, labels = miscalibrated()
    before = expected_calibration_error(torch.sigmoid(logits), labels)
    t = fit_temperature(logits, labels)
    after = expected_calibration_error(torch.sigmoid(logits / t), labels)
    assert 3.0 < t < 5.0
    assert before > 0.1 and after < before / 3


def test_select_threshold():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.6, 0.7, 0.8])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    t = select_threshold(probs, labels)
    assert 0.3 < t <= 0.6 and ((probs >= t).long() == labels).all()
    rate = select_threshold(torch.linspace(0, 1, 101), torch.zeros(101), "routing_rate", 0.25)
    assert float((torch.linspace(0, 1, 101) >= rate).float().mean()) == pytest.approx(0.25, abs=0.02)
    with pytest.raises(ValueError):
        select_threshold(probs, labels, "routing_rate", None)


def test_gate_calibration_callback_stores_temperature_and_threshold(tmp_path):
    logits, labels = miscalibrated(n=400)
    gate = IntentGate(hidden_size=8)
    logged = {}
    held = {"ids": [str(n) for n in range(len(labels))], "logits": logits, "labels": labels}
    module = SimpleNamespace(gate=gate, held_out_gate=lambda: held, log_dict=logged.update)
    trainer = SimpleNamespace(sanity_checking=False, current_epoch=0, is_global_zero=True,
                              default_root_dir=str(tmp_path), state=SimpleNamespace(fn="fit"))
    callback = GateCalibration()
    callback.on_validation_epoch_end(trainer, module)
    assert float(gate.temperature) == pytest.approx(callback.last["temperature"]) and float(gate.temperature) > 2
    assert float(gate.threshold) == pytest.approx(callback.last["threshold"])
    assert logged["calibration/ece_after"] < logged["calibration/ece_before"]
    assert (tmp_path / "calibration" / "reliability_epoch0.png").stat().st_size > 1000
    assert "temperature" in dict(gate.named_buffers()) and "threshold" in dict(gate.named_buffers())
    fit_files = {p.name: p.read_bytes() for p in (tmp_path / "calibration").iterdir()}

    # `prism validate` (inference mode) reports the stored calibration, changes nothing and writes its own files.
    stored = (float(gate.temperature), float(gate.threshold))
    trainer.state.fn = "validate"
    with torch.inference_mode():
        callback.on_validation_epoch_end(trainer, module)
    assert (float(gate.temperature), float(gate.threshold)) == stored
    assert callback.last["temperature"] == pytest.approx(stored[0])
    assert {p.name: p.read_bytes() for p in (tmp_path / "calibration").iterdir() if p.name in fit_files} == fit_files
    assert (tmp_path / "calibration" / "validate.json").is_file()
    assert (tmp_path / "calibration" / "reliability_validate.png").is_file()


@pytest.fixture
def tiny_gated_parts(tiny_backbones):
    from prism_lightning.model.gate_mlp import GateMLP
    from prism_lightning.model.lora import LoraSettings, attach_lora

    backbone = tiny_backbones(seed=0)
    peft_model = attach_lora(backbone, LoraSettings(rank=4, alpha=8, dropout=0.0)).eval()
    return backbone, peft_model, GateMLP(backbone.model.config.hidden_size).eval()


def write_mmlu_the_base_model_gets_right(tmp_path, gated) -> str:
    """A cais-style MMLU directory whose answers are the base model's own predictions: base accuracy 100 %."""
    rows = [{"question": f"Question {i}: which option fits case {i}?", "subject": s,
             "choices": [f"a{i}", f"b{i}", f"c{i}", f"d{i}"], "answer": 0}
            for i, s in enumerate(["college physics", "philosophy", "sociology", "virology"] * 6)]
    ids = [gated.prompt_ids(mmlu.prompt_text(r)) for r in rows]

    def base(batch, tokens, tail):
        return gated.token_logprobs(batch, tokens, "base", 16, tail)[0]

    predicted = mmlu.letter_reader(gated.formatter).read(base, ids).logprobs.argmax(-1)
    test = tmp_path / "mmlu" / "test"
    test.mkdir(parents=True)
    for subject in {r["subject"] for r in rows}:
        with (test / f"{subject.replace(' ', '_')}_test.csv").open("w", newline="") as fh:
            csv.writer(fh).writerows([[r["question"], *r["choices"], "ABCD"[int(p)]]
                                      for r, p in zip(rows, predicted) if r["subject"] == subject])
    return str(tmp_path / "mmlu")


@pytest.mark.parametrize("mode", ["stop", "warn"])
def test_discriminative_check_stops_a_run_whose_adapter_destroys_accuracy(tiny_gated_parts, tmp_path, mode):
    from prism_lightning.inference.gated_model import GatedModel

    backbone, peft_model, gate = tiny_gated_parts
    make = lambda: GatedModel(backbone, peft_model, gate, threshold=0.0, temperature=1.0,  # noqa: E731
                              adapters=[peft_model.active_adapter])
    source = write_mmlu_the_base_model_gets_right(tmp_path, make())
    trainer = SimpleNamespace(sanity_checking=False, current_epoch=0, global_step=5, should_stop=False,
                              state=SimpleNamespace(fn="fit"), logger=None)
    logged = {}
    module = SimpleNamespace(model=peft_model, gated=make, log_dict=logged.update)
    check = DiscriminativeAccuracyCheck(mmlu_source=source, n=24, tolerance=5.0, mode=mode)
    check.setup(trainer, module, "fit")

    check.on_validation_epoch_end(trainer, module)  # LoRA B = 0: the adapter changes nothing yet
    assert logged["disc/base_acc"] == 100.0 and logged["disc/drop"] == 0.0 and not trainer.should_stop

    with torch.no_grad():  # an adapter constructed to destroy accuracy
        g = torch.Generator().manual_seed(1)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 3.0)
    trainer.global_step = 10
    if mode == "stop":
        check.on_validation_epoch_end(trainer, module)
    else:
        with pytest.warns(UserWarning, match="MMLU accuracy fell"):
            check.on_validation_epoch_end(trainer, module)
    assert logged["disc/drop"] > 5.0
    assert trainer.should_stop is (mode == "stop")


@pytest.mark.parametrize("kind,run_placement,expected", [("persona", "user", "user"), ("persona", "system", "system"),
                                                         ("memory", "user", "user"), ("passages", "system", "user")])
def test_context_fidelity_puts_the_context_where_the_run_did(tmp_path, monkeypatch, kind, run_placement, expected):
    """A persona (or memory) goes where data.placement put it in training; a kind with a fixed place (passages:
    the user turn) keeps it."""
    import prism_lightning.training.callbacks.context_fidelity as fidelity
    from prism_lightning.contexts.personas import ContextSource, PersonaConfig

    context = tmp_path / "ctx.txt"
    context.write_text("The user's dog is Rex.\n")
    probes = tmp_path / "probes.jsonl"
    probes.write_text('{"kind": "probe", "question": "What is the dog called?", "choices": ["Rex", "Max"], '
                      '"answer": 0}\n')
    seen = {}

    def measure(gated, text, probe_list, placement, batch_size, adapter):
        seen["placement"] = placement
        return {"rows": [], "gate": {}}

    monkeypatch.setattr(fidelity, "measure_fidelity", measure)
    monkeypatch.setattr(fidelity, "print_fidelity", lambda *a: None)
    callback = fidelity.ContextFidelity(str(probes), context="mine")
    model = torch.nn.Linear(2, 2)
    module = SimpleNamespace(model=model, adapter_names=["default"], gated=lambda: None,
                             parameters=model.parameters)
    personas = PersonaConfig(names=[], contexts=[ContextSource(kind, str(context), "mine")])
    trainer = SimpleNamespace(is_global_zero=True, default_root_dir=str(tmp_path),
                              datamodule=SimpleNamespace(persona_config=personas, placement=run_placement,
                                                         adapter_of={}))
    callback.on_fit_end(trainer, module)
    assert seen["placement"] == expected
