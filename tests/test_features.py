"""Layer-0 gate features: equal to hidden_states[1], computed by a forward that stops after layer 0,
and untouched by the LoRA adapter (which never sits on layer 0)."""

from __future__ import annotations

import re

import pytest
import torch

from prism_lightning.model.backbone import Backbone, BackboneConfig, weights_fingerprint
from prism_lightning.model.chat import ChatFormatter
from prism_lightning.model.features import capture_layer0, first_decoder_layer, gather_positions, layer0_features
from prism_lightning.model.generation import left_pad
from prism_lightning.model.lora import ALL_PROJECTIONS, LoraSettings, attach_lora

QUERIES = ["Hi!",
           "What is the derivative of x squared times the sine of x?",
           "Explain briefly why the sky looks blue during the day."]


@pytest.fixture(params=["tiny", pytest.param("real", marks=pytest.mark.slow)])
def any_backbone(request, smol_tokenizer, tiny_llama):
    """A tiny random Llama, or the real embedded model."""
    if request.param == "real":
        return request.getfixturevalue("real_backbone")
    model = tiny_llama(0)
    return Backbone(model, smol_tokenizer, BackboneConfig(name_or_path="tiny-test-features"),
                    fingerprint=weights_fingerprint(model))


def _left_padded_prompts(backbone: Backbone) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    formatter = ChatFormatter(backbone.tokenizer)
    prompts = [formatter.prompt_ids(q) for q in QUERIES]
    assert len({len(p) for p in prompts}) == 3, "the prompts must have different lengths to exercise padding"
    ids, mask = left_pad(prompts, backbone.tokenizer.pad_token_id, backbone.device)
    return ids, mask, prompts


@torch.no_grad()
def test_layer0_features_equal_hidden_states_1(any_backbone):
    model = any_backbone.model
    ids, mask, prompts = _left_padded_prompts(any_backbone)
    assert (mask == 0).any(), "the batch must be left-padded"
    reference = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states[1]
    width = ids.shape[1]
    last = torch.full((3,), width - 1)
    first = torch.tensor([width - len(p) for p in prompts])  # first real token of every row
    middle = torch.tensor([width - len(p) // 2 for p in prompts])
    for positions in (last, first, middle):
        features = layer0_features(model, ids, mask, positions)
        assert features.shape == (3, model.config.hidden_size)
        assert features.dtype == torch.float32
        expected = reference[torch.arange(3), positions].float()
        torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)
    # Different rows really are different prompts (the comparison is not between identical vectors).
    feats = layer0_features(model, ids, mask, last)
    assert not torch.allclose(feats[0], feats[1], atol=1e-3)


class _CallCounter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *_args) -> None:
        self.calls += 1


@torch.no_grad()
def test_early_stop_skips_later_layers(any_backbone):
    model = any_backbone.model
    ids, mask, _ = _left_padded_prompts(any_backbone)
    layer1, layer0 = model.get_decoder().layers[1], model.get_decoder().layers[0]
    hooks_before = len(layer0._forward_hooks)
    counter1, counter0, head = _CallCounter(), _CallCounter(), _CallCounter()
    handles = [layer1.register_forward_hook(counter1), layer0.register_forward_hook(counter0),
               model.get_output_embeddings().register_forward_hook(head)]
    try:
        layer0_features(model, ids, mask, torch.full((3,), ids.shape[1] - 1))
        assert (counter0.calls, counter1.calls, head.calls) == (1, 0, 0)

        with capture_layer0(model, stop=True) as box:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            raise AssertionError("the forward should have stopped after layer 0")
        assert box["hidden"] is not None and (counter1.calls, head.calls) == (0, 0)

        # Control: without stop the whole model runs once and the hook still records layer 0.
        with capture_layer0(model, stop=False) as box:
            out = model(input_ids=ids, attention_mask=mask, use_cache=False)
        assert (counter1.calls, head.calls) == (1, 1)
        assert out.logits.shape[:2] == ids.shape
        assert box["hidden"].shape == (*ids.shape, model.config.hidden_size)
    finally:
        for h in handles:
            h.remove()
    # The capture hook is removed whether or not the forward was cut short.
    assert len(layer0._forward_hooks) == hooks_before


def test_gather_positions_picks_one_row_per_batch():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float64).view(2, 4, 3)
    out = gather_positions(hidden, torch.tensor([3, 1]))
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.stack([hidden[0, 3], hidden[1, 1]]).float())


# --------------------------------------------------------------------------- LoRA never on layer 0
def _tiny_backbone(tokenizer, tiny_llama) -> Backbone:
    model = tiny_llama(1)
    return Backbone(model, tokenizer, BackboneConfig(name_or_path="tiny-test-lora"),
                    fingerprint=weights_fingerprint(model))


def _randomise_lora_b(peft_model, seed: int = 0) -> int:
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
                n += 1
    return n


@torch.no_grad()
def test_lora_changes_logits_but_never_layer0_features(smol_tokenizer, tiny_llama):
    backbone = _tiny_backbone(smol_tokenizer, tiny_llama)
    ids, mask, _ = _left_padded_prompts(backbone)
    positions = torch.full((3,), ids.shape[1] - 1)
    valid = mask.bool()
    before_feats = layer0_features(backbone.model, ids, mask, positions)
    before_h1 = backbone.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]
    before_logits = backbone.model(input_ids=ids, attention_mask=mask).logits

    peft_model = attach_lora(backbone, LoraSettings(rank=4, alpha=8))
    peft_model.eval()
    assert _randomise_lora_b(peft_model) == 2 * len(ALL_PROJECTIONS)  # 7 projections on layers 1 and 2

    after_feats = layer0_features(peft_model, ids, mask, positions)
    out = peft_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(after_feats, before_feats, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.hidden_states[1][valid], before_h1[valid], atol=1e-6, rtol=0)
    # Layers 1.. carry the adapter: their outputs and the logits move.
    assert (out.logits[valid] - before_logits[valid]).abs().max() > 1e-2
    # ...and the adapter is what moved them: disabling it restores the base logits.
    with peft_model.disable_adapter():
        restored = peft_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(restored[valid], before_logits[valid], atol=1e-5, rtol=0)


_LORA_NAME = re.compile(r"\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_A$")


def test_lora_modules_on_every_layer_but_layer0(smol_tokenizer, tiny_llama):
    backbone = _tiny_backbone(smol_tokenizer, tiny_llama)
    n_layers = len(backbone.decoder_layers())
    peft_model = attach_lora(backbone, LoraSettings())
    names = [n for n, _ in peft_model.named_modules()]
    assert not [n for n in names if "layers.0." in n and "lora" in n]
    placed = set()
    for name in names:
        match = _LORA_NAME.search(name)
        if match:
            placed.add((int(match.group(1)), match.group(2)))
    assert placed == {(layer, proj) for layer in range(1, n_layers) for proj in ALL_PROJECTIONS}
    # Only LoRA weights train; the base (layer 0 included) is frozen.
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert first_decoder_layer(peft_model) is backbone.model.get_decoder().layers[0]
