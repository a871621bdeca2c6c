"""K-way PRISM: K adapters, one gate with K + 1 outcomes; binary PRISM is K = 1 of the same code."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from prism_lightning.inference.export import CONFIG_FILE
from prism_lightning.inference.gated_model import BASE, GatedModel
from prism_lightning.model.adapters import adapter_names, adapter_of, check_adapters
from prism_lightning.model.chat import ChatFormatter
from prism_lightning.model.gate_mlp import GateMLP, open_logit, route_loss
from prism_lightning.model.generation import DecodingConfig
from prism_lightning.model.row_routing import rows_on_adapters
from prism_lightning.training.datamodule import Collator
from prism_lightning.training.modules import LoraSettings, PrismModule
from prism_lightning.utils.errors import PrismError

ADAPTERS = ["memory", "tools", "docs"]
PROMPTS = [f"Question {n}: " + q for n, q in enumerate([
    "Hi!", "How do I integrate x times e to the x?", "What is a monad, in plain words?", "Name three primes.",
    "What is my dog called?", "Book me a taxi to the airport.", "Where is the station?", "Why is the sky blue?"] * 2)]


def test_adapter_groups_are_checked():
    contexts = ["mem", "reg", "docs"]
    assert adapter_names({}) == ["default"] and adapter_names(None) == ["default"]
    assert adapter_of({}, contexts) == {"mem": 0, "reg": 0, "docs": 0}
    groups = {"a": ["mem"], "b": ["reg", "docs"]}
    assert adapter_names(groups) == ["a", "b"] and adapter_of(groups, contexts) == {"mem": 0, "reg": 1, "docs": 1}
    for bad, match in [({"a": ["mem", "reg"], "b": ["reg", "docs"]}, "'reg' is already distilled by adapter 'a'"),
                       ({"a": ["mem"], "b": ["reg"]}, "context 'docs' is in no adapter"),
                       ({"a": ["mem", "reg", "docs", "diary"]}, "unknown context 'diary'"),
                       ({"a": [], "b": contexts}, "data.adapters.a: lists no contexts"),
                       ({"__base__": contexts}, "cannot name an adapter"),
                       ({"gate": contexts}, "cannot name an adapter")]:
        with pytest.raises(PrismError, match=match):
            adapter_of(bad, contexts)
    with pytest.raises(PrismError, match=r"trained with 1 adapter\(s\) \(default\) but this run asks for 3"):
        check_adapters(["default"], ADAPTERS, "the checkpoint")


def test_one_output_gate_is_the_binary_gate():
    torch.manual_seed(0)
    gate, x = GateMLP(16, (8,)), torch.randn(6, 16)
    z = gate.adapter_logits(x)
    assert z.shape == (6, 1)
    torch.testing.assert_close(gate(x), z[:, 0])
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    torch.testing.assert_close(route_loss(z, labels), F.binary_cross_entropy_with_logits(z[:, 0], labels.float()))
    # The K + 1-way cross-entropy with the none logit pinned at 0 is the same function at K = 1.
    full = torch.cat([torch.zeros(6, 1), z], dim=1)
    torch.testing.assert_close(F.cross_entropy(full, labels), route_loss(z, labels))


def test_k_way_gate_open_logit_and_loss():
    torch.manual_seed(0)
    z = torch.randn(5, 3)
    p_none = torch.softmax(torch.cat([torch.zeros(5, 1), z], 1), 1)[:, 0]
    torch.testing.assert_close(torch.sigmoid(open_logit(z)), 1 - p_none)
    routes = torch.tensor([0, 1, 2, 3, 0])
    expected = -torch.log_softmax(torch.cat([torch.zeros(5, 1), z], 1), 1)[torch.arange(5), routes].mean()
    torch.testing.assert_close(route_loss(z, routes), expected)


def test_collator_gives_each_distill_row_its_adapter(smol_tokenizer):
    texts = {"mem": "Memory: the user's dog is Rex.", "reg": "Tools: get_weather(city).", "docs": "Passages: x."}
    items = [{"id": f"i{n}", "label": label, "query": "q?", "persona_answer": "a", "baseline_answer": "b",
              "target_persona": target} for n, (label, target) in enumerate(
        [(1, "mem"), (1, "reg"), (1, "docs"), (0, "reg")])]
    batch = Collator(ChatFormatter(smol_tokenizer), texts, 256,
                     adapter_of=adapter_of({"a": ["mem"], "b": ["reg"], "c": ["docs"]}, list(texts)))(items)
    assert batch["route"].tolist() == [1, 2, 3, 0]
    assert Collator(ChatFormatter(smol_tokenizer), texts, 256)(items)["route"].tolist() == [1, 1, 1, 0]


def _k_way(tiny_backbones, adapters=ADAPTERS, seed: int = 0) -> PrismModule:
    module = PrismModule(backbone=tiny_backbones(seed).config, lora=LoraSettings(rank=4, alpha=8, dropout=0.0),
                         adapters=adapters)
    module.configure_model()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every adapter visibly different, the gate's choices spread
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for p in module.gate.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


def test_a_row_trains_only_its_own_adapter(tiny_backbones, smol_tokenizer):
    module = _k_way(tiny_backbones)
    texts = {"mem": "Memory: the user's dog is Rex.", "reg": "Tools: get_weather(city).", "docs": "Passages: x."}
    items = [{"id": f"i{n}", "label": 1, "query": "What is my dog called?", "persona_answer": "Rex, your dog.",
              "baseline_answer": "b", "target_persona": "reg"} for n in range(2)]
    batch = Collator(ChatFormatter(smol_tokenizer), texts, 256,
                     adapter_of=adapter_of(dict(zip(ADAPTERS, [["mem"], ["reg"], ["docs"]])), list(texts)))(items)
    out, _ = module.shared_step(batch)
    out["loss"].backward()
    grads = {a: sum(float(p.grad.abs().sum()) for n, p in module.model.named_parameters()
                    if f".{a}." in n and p.grad is not None) for a in ADAPTERS}
    assert grads["tools"] > 0 and grads["memory"] == 0 and grads["docs"] == 0
    assert module.gate.mlp.net[-1].weight.grad is not None and module.gate.mlp.net[-1].weight.shape[0] == 3


def test_a_mixed_batch_sends_each_rows_gradient_to_its_own_adapter_only(tiny_backbones, smol_tokenizer):
    """Rows of two contexts in one batch: each adapter's gradient equals the gradient of its rows alone."""
    texts = {"mem": "Memory: the user's dog is Rex.", "reg": "Tools: get_weather(city).", "docs": "Passages: x."}
    collate = Collator(ChatFormatter(smol_tokenizer), texts, 256,
                       adapter_of=adapter_of(dict(zip(ADAPTERS, [["mem"], ["reg"], ["docs"]])), list(texts)))
    items = [{"id": f"i{n}", "label": 1, "query": f"What is my dog called, {n}?", "persona_answer": "Rex, your dog.",
              "baseline_answer": "b", "target_persona": persona} for n, persona in enumerate(["mem", "reg", "mem"])]

    def grads(rows) -> dict[str, torch.Tensor]:
        module = _k_way(tiny_backbones)
        out, _ = module.shared_step(collate(rows))
        out["loss"].backward()
        return {a: torch.cat([p.grad.flatten() for n, p in module.model.named_parameters()
                              if f".{a}." in n and "lora_" in n and p.grad is not None] or [torch.zeros(1)])
                for a in ADAPTERS}

    mixed = grads(items)
    memory_only, tools_only = grads([items[0], items[2]]), grads([items[1]])
    assert float(mixed["docs"].abs().sum()) == 0.0
    assert float(mixed["memory"].abs().sum()) > 0 and float(mixed["tools"].abs().sum()) > 0
    # The KL is a mean per distill token, so the batches scale it differently; its direction per adapter must be
    # that of the adapter's own rows (a row leaking into another adapter would turn it).
    cos = torch.nn.functional.cosine_similarity
    assert float(cos(mixed["memory"], memory_only["memory"], dim=0)) == pytest.approx(1.0, abs=1e-4)
    assert float(cos(mixed["tools"], tools_only["tools"], dim=0)) == pytest.approx(1.0, abs=1e-4)


def test_a_standalone_k_way_gate_trains_on_routes_never_on_the_binary_label():
    from prism_lightning.training.modules.gate import IntentGate

    gate = IntentGate(hidden_size=8, outputs=3, standardize=False)  # the loss math, on fixed inputs
    g = torch.Generator().manual_seed(0)
    batch = {"features": torch.randn(6, 8, generator=g), "label": torch.tensor([1, 1, 1, 0, 1, 0]),
             "route": torch.tensor([1, 2, 3, 0, 3, 0])}
    expected = route_loss(gate.mlp.adapter_logits(batch["features"]), batch["route"])
    assert float(gate.training_step(batch, 0)) == pytest.approx(float(expected))
    assert float(expected) != pytest.approx(float(route_loss(gate.mlp.adapter_logits(batch["features"]),
                                                             batch["label"])))
    with pytest.raises(PrismError, match="outputs=3: batches need a 'route'"):
        gate.training_step({k: v for k, v in batch.items() if k != "route"}, 0)
    binary = IntentGate(hidden_size=8)
    assert float(binary.training_step({k: v for k, v in batch.items() if k != "route"}, 0)) > 0


@torch.no_grad()
def test_k_way_export_round_trip_routes_a_mixed_batch_exactly(tiny_backbones, tmp_path):
    module = _k_way(tiny_backbones)
    module.model.eval()
    directory = module.export(tmp_path / "export")
    config = json.loads((directory / CONFIG_FILE).read_text())
    assert config["gate"]["adapters"] == ADAPTERS
    for name in ADAPTERS[1:]:  # PEFT's layout: the first adapter at the top, the others in folders of their name
        assert (directory / "adapter" / name / "adapter_model.safetensors").is_file()
    reference = module.gated()
    fresh = tiny_backbones(0, name=module.backbone.config.name_or_path)  # what a new process loads
    gated = GatedModel.from_pretrained(directory)
    assert gated.adapters == ADAPTERS and gated.backbone is fresh
    ids = [gated.prompt_ids(p) for p in PROMPTS]
    torch.testing.assert_close(reference.gate_outputs(ids)[0], gated.gate_outputs(ids)[0])  # the export's gate
    spread_choices(gated, ids)
    probs, choice = gated.gate_outputs(ids)
    gated.threshold = float(probs.median())  # about half the rows open, on adapters the gate picks
    decoding = DecodingConfig(max_new_tokens=8, batch_size=16)
    mixed = gated.generate_ids(ids, decoding)  # one batch of 16, one generate call
    routes = [r.get("adapter") or BASE for r in mixed]
    assert {BASE} < set(routes) and len(set(routes) - {BASE}) >= 2, routes
    for n, (row, route) in enumerate(zip(mixed, routes)):
        assert route == (BASE if probs[n] < gated.threshold else ADAPTERS[choice[n]])
        alone = gated.generate_ids([ids[n]], DecodingConfig(max_new_tokens=8, batch_size=1),
                                   route="base" if route == BASE else route)[0]
        assert row["text"] == alone["text"], (n, route)


def spread_choices(gated: GatedModel, ids) -> None:
    """Re-centre the gate's last layer on these prompts, so that its adapter choices differ between rows (an
    untrained gate on a tiny random model picks one adapter for every prompt)."""
    from prism_lightning.model.features import layer0_features
    from prism_lightning.model.generation import left_pad

    padded, mask = left_pad(ids, gated.backbone.tokenizer.pad_token_id, gated.backbone.device)
    with torch.no_grad(), gated.model.disable_adapter():
        features = layer0_features(gated.model, padded, mask, torch.full((len(ids),), padded.shape[1] - 1))
        hidden = gated.gate.net[:-1](features.float())
        last = gated.gate.net[-1]
        last.weight.copy_(torch.randn(last.weight.shape, generator=torch.Generator().manual_seed(1)))
        last.weight.mul_(1 / hidden.std(0).mean().clamp(min=1e-6))
        last.bias.copy_(-(hidden @ last.weight.T).mean(0))


def test_rows_on_adapters_match_one_active_adapter(tiny_backbones):
    module = _k_way(tiny_backbones)
    model = module.model.eval()
    ids = torch.tensor([[1, 42, 7, 99, 5, 600]] * 4)
    routes = ["tools", BASE, "memory", "docs"]
    with torch.no_grad(), rows_on_adapters(model, routes, ADAPTERS) as extra:
        mixed = model(input_ids=ids, **extra).logits
    with torch.no_grad():
        for b, route in enumerate(routes):
            if route == BASE:
                with model.disable_adapter():
                    alone = model(input_ids=ids[b:b + 1]).logits
            else:
                model.base_model.set_adapter(route)
                alone = model(input_ids=ids[b:b + 1]).logits
                model.base_model.set_adapter(ADAPTERS)
            torch.testing.assert_close(mixed[b:b + 1], alone, atol=1e-5, rtol=0)


def test_a_checkpoint_of_fewer_adapters_is_refused(tiny_backbones):
    one = PrismModule(backbone=tiny_backbones(0).config, lora=LoraSettings(rank=4, alpha=8))
    one.configure_model()
    checkpoint = {"state_dict": one.state_dict()}
    one.on_save_checkpoint(checkpoint)
    three = _k_way(tiny_backbones)
    with pytest.raises(PrismError) as info:
        three.on_load_checkpoint(checkpoint)
    assert "trained with 1 adapter(s) (default) but this run asks for 3" in str(info.value)
    assert "\n" not in str(info.value)


def test_the_adapter_choice_line_counts_distill_items_only():
    from prism_lightning.training.summary import adapter_choice_line

    held = {"routes": torch.tensor([0, 1, 2, 3, 3, 0]), "choice": torch.tensor([2, 1, 2, 1, 3, 1])}
    line = adapter_choice_line(held, ADAPTERS)
    assert "on 3 of 4 held-out distill items (75 %" in line and "chance 33 %" in line
    assert adapter_choice_line(held, ["default"]) == ""


def test_k_way_with_gradient_checkpointing_is_refused(tiny_backbones):
    module = PrismModule(backbone=tiny_backbones(0).config, lora=LoraSettings(rank=4, alpha=8), adapters=ADAPTERS,
                         gradient_checkpointing=True)
    with pytest.raises(PrismError, match="gradient_checkpointing: not supported with several adapters"):
        module.configure_model()
