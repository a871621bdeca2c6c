"""Export artifact, its checks, and GatedModel routing (mixed adapter/base batches) on a tiny random Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prism_lightning.inference.export import ADAPTER_DIR, CONFIG_FILE, GATE_FILE, REQUIRED, check_export
from prism_lightning.inference.gated_model import BASE, GatedModel
from prism_lightning.model.backbone import Backbone, BackboneConfig, weights_fingerprint
from prism_lightning.model.gate_mlp import GateMLP
from prism_lightning.model.generation import DecodingConfig, generate_batch, left_pad
from prism_lightning.model.lora import ALL_PROJECTIONS
from prism_lightning.training.modules import LoraSettings, PrismModule
from prism_lightning.utils.errors import PrismError

PROMPTS = ["Hi!",
           "How do I integrate x times e to the x?",
           "What is a monad, in one or two plain sentences, please?",
           "Name three primes."]
DECODING = DecodingConfig(max_new_tokens=12, batch_size=8)


def _randomise(module: PrismModule, seed: int = 0) -> None:
    """Give the adapter and the gate weights that visibly change outputs and spread gate probabilities."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for p in module.gate.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _export(tiny_backbones, directory: Path, seed: int = 0, **kwargs) -> tuple[Path, Backbone, PrismModule]:
    backbone = tiny_backbones(seed)
    module = PrismModule(backbone=backbone.config, lora=LoraSettings(rank=4, alpha=8), **kwargs)
    module.configure_model()
    _randomise(module)
    module.model.eval()
    return module.export(directory), backbone, module


def _fresh_process(tiny_backbones, backbone: Backbone, seed: int = 0) -> Backbone:
    """What a new process would load for the same name: an unwrapped copy of the same weights."""
    fresh = tiny_backbones(seed, name=backbone.config.name_or_path)
    assert fresh.fingerprint == backbone.fingerprint
    return fresh


def _pristine(tiny_llama, tokenizer, seed: int = 0) -> Backbone:
    """An untouched copy of the base weights, never wrapped by PEFT and outside the cache."""
    model = tiny_llama(seed)
    return Backbone(model, tokenizer, BackboneConfig(name_or_path="tiny-pristine"), weights_fingerprint(model))


# --------------------------------------------------------------------------- export
def test_export_writes_a_complete_artifact(tiny_backbones, tiny_llama, tmp_path):
    from peft import PeftModel

    directory, backbone, module = _export(tiny_backbones, tmp_path / "export", placement="user", threshold=0.3)
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "gate.safetensors",
                 "prism.json"):
        assert (directory / name).is_file(), name

    config = json.loads((directory / CONFIG_FILE).read_text())
    assert config == check_export(directory)
    assert config["base_model"] == backbone.reference
    assert config["backbone"]["name_or_path"] == backbone.config.name_or_path
    assert config["feature_layer"] == 0
    assert config["persona_placement_trained"] == "user"
    assert config["gate"]["threshold"] == pytest.approx(0.3)
    assert config["gate"]["temperature"] == pytest.approx(1.0)
    assert config["gate"]["hidden_size"] == 64 and config["gate"]["dims"] == [128, 64]

    adapter_config = json.loads((directory / ADAPTER_DIR / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4
    assert sorted(adapter_config["target_modules"]) == sorted(ALL_PROJECTIONS)
    assert adapter_config["layers_to_transform"] == [1, 2]

    # The gate file reproduces the trained gate.
    assert config["gate"]["standardize"] is True  # the default gate scales its features (FeatureStandardizer)
    gate = GateMLP(64, (128, 64), standardize=True)
    gate.load_state_dict(load_file(directory / GATE_FILE))
    x = torch.randn(5, 64)
    torch.testing.assert_close(gate(x), module.gate.mlp(x))

    # The adapter loads with plain PEFT on a fresh copy of the base and reproduces the trained model.
    ids = torch.tensor([[1, 42, 7, 99, 5, 600]])
    with torch.no_grad():
        trained = module.model(input_ids=ids).logits
        base = tiny_llama(0)(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(tiny_llama(0), str(directory / ADAPTER_DIR)).eval()(input_ids=ids).logits
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=0)
    assert (loaded - base).abs().max() > 1e-2


@pytest.mark.parametrize("missing", [*REQUIRED, "adapter/adapter_config.json", "adapter/adapter_model.safetensors"])
def test_check_export_names_the_missing_file(tiny_backbones, tmp_path, missing):
    directory, _, _ = _export(tiny_backbones, tmp_path / "export")
    check_export(directory)  # complete: accepted
    (directory / missing).unlink()
    with pytest.raises(PrismError) as info:
        check_export(directory)
    assert missing in str(info.value)
    with pytest.raises(PrismError, match="missing"):
        GatedModel.from_pretrained(directory)


def test_check_export_rejects_a_missing_directory_and_malformed_json(tiny_backbones, tmp_path):
    with pytest.raises(PrismError, match="not found"):
        check_export(tmp_path / "nowhere")
    directory, _, _ = _export(tiny_backbones, tmp_path / "export")
    (directory / CONFIG_FILE).write_text('{"format_version": 1,\n oops}')
    with pytest.raises(PrismError, match=r"prism\.json:2"):
        check_export(directory)


@pytest.mark.parametrize("how", ["other weights under the same name", "edited fingerprint"])
def test_export_for_another_base_is_refused(tiny_backbones, tmp_path, how):
    directory, backbone, _ = _export(tiny_backbones, tmp_path / "export")
    if how == "edited fingerprint":
        config = json.loads((directory / CONFIG_FILE).read_text())
        config["base_model"]["fingerprint"] = "0123456789abcdef"
        (directory / CONFIG_FILE).write_text(json.dumps(config))
    else:
        other = tiny_backbones(seed=1, name=backbone.config.name_or_path)
        assert other.fingerprint != backbone.fingerprint
    with pytest.raises(PrismError, match="made for base model"):
        GatedModel.from_pretrained(directory)


# --------------------------------------------------------------------------- routing
@pytest.fixture(params=["same process", "fresh process"])
def gated(request, tiny_backbones, tmp_path):
    """(GatedModel, its export directory): loaded right after training, or as a new process would."""
    directory, backbone, _ = _export(tiny_backbones, tmp_path / "export")
    if request.param == "fresh process":
        _fresh_process(tiny_backbones, backbone)
    return GatedModel.from_pretrained(directory), directory


def _prompt_ids(gm: GatedModel) -> list[list[int]]:
    ids = [gm.formatter.prompt_ids(p) for p in PROMPTS]
    assert len({len(i) for i in ids}) == len(ids)
    return ids


@torch.no_grad()
def test_mixed_batch_rows_match_separate_adapter_and_base_passes(gated, tiny_llama):
    gm, _ = gated
    ids, mask = left_pad(_prompt_ids(gm), gm.backbone.tokenizer.pad_token_id, gm.backbone.device)
    valid = mask.bool()
    names = [gm.adapter_name, BASE, gm.adapter_name, BASE]
    mixed = gm.model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    adapter = gm.model(input_ids=ids, attention_mask=mask).logits
    with gm.model.disable_adapter():
        base = gm.model(input_ids=ids, attention_mask=mask).logits
    untouched = tiny_llama(0)(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(base[valid], untouched[valid], atol=1e-5, rtol=0)
    for row in (1, 3):
        torch.testing.assert_close(mixed[row][valid[row]], base[row][valid[row]], atol=1e-5, rtol=0)
    for row in (0, 2):
        torch.testing.assert_close(mixed[row][valid[row]], adapter[row][valid[row]], atol=1e-5, rtol=0)
        assert (adapter[row][valid[row]] - base[row][valid[row]]).abs().max() > 1e-2


@torch.no_grad()
def test_route_reads_layer0_at_the_last_prompt_token(gated, tiny_llama):
    gm, _ = gated
    prompts = _prompt_ids(gm)
    # Expected values from each prompt alone (no padding at all), not from the padded batch under test.
    model = tiny_llama(0)
    hidden = torch.stack([model(input_ids=torch.tensor([p]), output_hidden_states=True).hidden_states[1][0, -1]
                          for p in prompts])
    expected = torch.sigmoid(gm.gate(hidden) / gm.temperature)
    probs = gm.route(prompts)
    assert probs.shape == (len(PROMPTS),)
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=0)
    assert probs.max() - probs.min() > 1e-3  # the prompts are told apart


def test_generate_routes_by_threshold_and_base_route_is_the_untouched_model(gated, tiny_llama, smol_tokenizer):
    gm, _ = gated
    prompts = _prompt_ids(gm)
    probs = gm.route(prompts)
    gm.threshold = float(probs.median())  # forces a mix of adapter and base rows
    expected_routes = ["adapter" if p >= gm.threshold else "base" for p in probs.tolist()]
    assert set(expected_routes) == {"adapter", "base"}

    results = gm.generate(PROMPTS, DECODING)
    assert len(results) == len(PROMPTS)
    for result, route, p in zip(results, expected_routes, probs.tolist()):
        assert {"text", "probability", "route"} <= set(result)
        assert result["route"] == route
        assert result["probability"] == pytest.approx(p, abs=1e-4)
        assert isinstance(result["text"], str) and result["new_tokens"] > 0

    base_only = gm.generate(PROMPTS, DECODING, route="base")
    adapter_only = gm.generate(PROMPTS, DECODING, route="adapter")
    assert all(r["route"] == "base" for r in base_only) and all(r["route"] == "adapter" for r in adapter_only)
    reference = generate_batch(_pristine(tiny_llama, smol_tokenizer), prompts, DECODING, seed=DECODING.seed)
    assert [r["text"] for r in base_only] == [r["text"] for r in reference]
    assert [r["text"] for r in adapter_only] != [r["text"] for r in base_only]
    # Each gated row is what its route gives on its own.
    for row, result in enumerate(results):
        alone = adapter_only[row] if result["route"] == "adapter" else base_only[row]
        assert result["text"] == alone["text"]


def test_module_gated_matches_the_exported_model(tiny_backbones, tmp_path):
    directory, backbone, module = _export(tiny_backbones, tmp_path / "export")
    prompts = PROMPTS[:3]
    in_training = module.gated()
    live = in_training.generate(prompts, DECODING, route="adapter")
    live_probs = [r["probability"] for r in in_training.generate(prompts, DECODING, route="base")]
    _fresh_process(tiny_backbones, backbone)
    exported = GatedModel.from_pretrained(directory)
    assert exported.threshold == pytest.approx(float(module.gate.threshold))
    loaded = exported.generate(prompts, DECODING, route="adapter")
    assert [r["text"] for r in loaded] == [r["text"] for r in live]
    assert [r["probability"] for r in loaded] == live_probs


@torch.no_grad()
def test_per_row_lora_scaling_gives_peft_mixed_batch_logits_and_restores_the_adapter(gated):
    """GatedModel's mixed batches scale each row's LoRA delta by 1 or 0 (no sub-batch gather/scatter per module):
    the same logits as PEFT's adapter_names path, and the adapter is untouched afterwards."""
    from prism_lightning.model.row_routing import lora_layers, rows_on_adapter

    gm, _ = gated
    ids, mask = left_pad(_prompt_ids(gm), gm.backbone.tokenizer.pad_token_id, gm.backbone.device)
    valid = mask.bool()
    use = [True, False, True, False]
    names = [gm.adapter_name if u else BASE for u in use]
    reference = gm.model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    before = [m.scaling[gm.adapter_name] for m in lora_layers(gm.model, gm.adapter_name)]
    with rows_on_adapter(gm.model, gm.adapter_name, use) as extra:
        assert extra == {}
        scaled = gm.model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(scaled[valid], reference[valid], atol=1e-5, rtol=0)
    assert [m.scaling[gm.adapter_name] for m in lora_layers(gm.model, gm.adapter_name)] == before and before
    with gm.model.disable_adapter():
        base = gm.model(input_ids=ids, attention_mask=mask).logits
    with rows_on_adapter(gm.model, gm.adapter_name, [False] * 4):  # all base: the adapter-disabled path
        torch.testing.assert_close(gm.model(input_ids=ids, attention_mask=mask).logits, base)
