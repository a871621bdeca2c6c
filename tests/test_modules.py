"""Collator alignment, DistillationStudent/PrismModule losses and checkpoints, and IntentGate training."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from prism_lightning.contexts.personas import PersonaConfig, PersonaRegistry
from prism_lightning.model.backbone import BackboneConfig
from prism_lightning.model.chat import ChatFormatter
from prism_lightning.model.lora import ALL_PROJECTIONS
from prism_lightning.training.datamodule import Collator
from prism_lightning.training.losses import kl_divergence, response_logits
from prism_lightning.training.modules import IntentGate, LoraSettings, PrismModule
from prism_lightning.utils.errors import PrismError

GEN_PROMPT = "<|im_start|>assistant\n"
PERSONAS = {"math": "You are a meticulous mathematician who proves every step.",
            "coding": "You are a senior Python engineer who writes small, tested functions."}


def _item(item_id: str, label: int, persona: str = "math", query: str = "How do I add two fractions?",
          persona_answer: str = "Find a common denominator, rewrite both fractions over it, then add numerators.",
          baseline_answer: str = "Add them together.") -> dict:
    return {"id": item_id, "query": query, "label": label, "target_persona": persona,
            "persona_answer": persona_answer, "baseline_answer": baseline_answer}


ITEMS = [
    _item("d-math", 1),
    _item("d-code", 1, "coding", "Write a function that reverses a list in Python.",
          "Use slicing: def rev(xs): return xs[::-1]. It returns a new list and leaves the input unchanged.",
          "Reverse it."),
    _item("r-0", 0, "math", "What is the capital of France?", "Paris, the capital since the Middle Ages.",
          "The capital of France is Paris."),
]


@pytest.fixture
def formatter(smol_tokenizer) -> ChatFormatter:
    return ChatFormatter(smol_tokenizer)


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


# --------------------------------------------------------------------------- Collator
def test_student_and_teacher_share_every_response_token(formatter):
    batch = Collator(formatter, PERSONAS, max_length=512)(ITEMS)
    s_ids, t_ids = batch["student_ids"], batch["teacher_ids"]
    mask = batch["response_mask"]
    for b, item in enumerate(ITEMS):
        answer = item["persona_answer"] if item["label"] else item["baseline_answer"]
        expected = formatter.response_ids(answer)
        assert int(mask[b].sum()) == len(expected)
        steps = mask[b].nonzero().flatten()
        student_tokens = s_ids[b, batch["student_pos"][b, steps] + 1]
        teacher_tokens = t_ids[b, batch["teacher_pos"][b, steps] + 1]
        assert student_tokens.tolist() == teacher_tokens.tolist() == expected
        # The masks cover exactly prompt + response on each side (right padding).
        assert int(batch["student_mask"][b].sum()) == int(batch["student_pos"][b, steps[-1]]) + 2
        assert int(batch["teacher_mask"][b].sum()) == int(batch["teacher_pos"][b, steps[-1]]) + 2
    # Distill rows put the persona in the teacher prompt (replacing the template's default system prompt),
    # so the two prompts differ in length and the alignment is not a trivial identity.
    for b in (0, 1):
        assert (batch["teacher_pos"][b] != batch["student_pos"][b]).all()
    assert batch["label"].tolist() == [1.0, 1.0, 0.0]
    assert batch["ids"] == ["d-math", "d-code", "r-0"]


def test_feature_position_is_the_last_generation_prompt_token(formatter, smol_tokenizer):
    batch = Collator(formatter, PERSONAS)(ITEMS)
    gen_ids = smol_tokenizer(GEN_PROMPT, add_special_tokens=False)["input_ids"]
    for b, item in enumerate(ITEMS):
        pos = int(batch["feature_pos"][b])
        prompt = batch["student_ids"][b, :pos + 1].tolist()
        assert prompt == formatter.prompt_ids(item["query"])  # persona-free prompt, as at inference
        assert prompt[-len(gen_ids):] == gen_ids
        assert _decode(smol_tokenizer, prompt).endswith(GEN_PROMPT)
        # The next token is already the response, and the first response step is predicted right here.
        assert int(batch["student_pos"][b, 0]) == pos
        answer = item["persona_answer"] if item["label"] else item["baseline_answer"]
        assert int(batch["student_ids"][b, pos + 1]) == formatter.response_ids(answer)[0]


def test_distill_items_give_the_persona_to_the_teacher_only(formatter, smol_tokenizer):
    batch = Collator(formatter, PERSONAS)(ITEMS)
    for b, name in ((0, "math"), (1, "coding")):
        teacher = _decode(smol_tokenizer, batch["teacher_ids"][b][batch["teacher_mask"][b].bool()].tolist())
        student = _decode(smol_tokenizer, batch["student_ids"][b][batch["student_mask"][b].bool()].tolist())
        assert PERSONAS[name] in teacher
        assert not any(p in student for p in PERSONAS.values())
        assert ITEMS[b]["persona_answer"] in student and ITEMS[b]["persona_answer"] in teacher


def test_retain_items_use_the_baseline_answer_and_no_persona(formatter, smol_tokenizer):
    batch = Collator(formatter, PERSONAS)(ITEMS)
    b = 2
    s_len, t_len = int(batch["student_mask"][b].sum()), int(batch["teacher_mask"][b].sum())
    assert s_len == t_len
    assert torch.equal(batch["student_ids"][b, :s_len], batch["teacher_ids"][b, :t_len])
    assert torch.equal(batch["student_pos"][b], batch["teacher_pos"][b])
    text = _decode(smol_tokenizer, batch["teacher_ids"][b, :t_len].tolist())
    assert ITEMS[b]["baseline_answer"] in text
    assert ITEMS[b]["persona_answer"] not in text
    assert not any(p in text for p in PERSONAS.values())


def test_max_length_truncates_only_the_response(formatter):
    item = ITEMS[1]
    teacher_prompt = formatter.prompt_ids(item["query"], PERSONAS["coding"])
    student_prompt = formatter.prompt_ids(item["query"])
    longest = max(len(teacher_prompt), len(student_prompt))
    response = formatter.response_ids(item["persona_answer"])
    keep = 5
    assert len(response) > keep
    batch = Collator(formatter, PERSONAS, max_length=longest + keep)([item])
    assert int(batch["response_mask"].sum()) == keep
    assert batch["teacher_ids"][0].tolist() == teacher_prompt + response[:keep]
    assert batch["student_ids"][0].tolist() == student_prompt + response[:keep]
    assert int(batch["feature_pos"][0]) == len(student_prompt) - 1
    # A prompt that does not fit is an error naming the item, never a silently cut prompt.
    with pytest.raises((PrismError, ValueError), match="d-code"):
        Collator(formatter, PERSONAS, max_length=longest)([item])


# --------------------------------------------------------------------------- tiny PrismModule
def _randomise_lora_b(peft_model, seed: int = 0, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture
def tiny_prism(tiny_backbone):
    def make(**kwargs) -> PrismModule:
        kwargs.setdefault("lora", LoraSettings(rank=4, alpha=8))
        module = PrismModule(backbone=tiny_backbone.config, **kwargs)
        module.configure_model()
        return module
    return make


@pytest.fixture
def tiny_batch(tiny_backbone):
    collator = Collator(ChatFormatter(tiny_backbone.tokenizer), PERSONAS, max_length=128)
    return collator([ITEMS[0], ITEMS[2]])  # one distill row, one retain row


def test_distill_kl_uses_the_frozen_base_with_persona_as_teacher(tiny_prism, tiny_batch, tiny_llama):
    module = tiny_prism()
    _randomise_lora_b(module.model)
    module.model.eval()
    with torch.no_grad():
        hidden = module.student_hidden(tiny_batch)
        out = module.distill_loss(tiny_batch, hidden)
        student = module.head_logits(hidden)
        # Independent teacher: an untouched copy of the same base weights on the persona prompt.
        pristine = tiny_llama(0)
        teacher = pristine(input_ids=tiny_batch["teacher_ids"], attention_mask=tiny_batch["teacher_mask"]).logits
    rows = tiny_batch["response_mask"] & (tiny_batch["label"] > 0.5)[:, None]
    expected = kl_divergence(response_logits(teacher, tiny_batch["teacher_pos"])[rows],
                             response_logits(student, tiny_batch["student_pos"])[rows], 2.0, 64).mean()
    assert set(out) == {"kl", "loss"}
    torch.testing.assert_close(out["kl"], expected, atol=1e-5, rtol=1e-5)
    assert out["kl"] > 1e-3


def test_retain_weight_adds_a_retain_kl_term(tiny_prism, tiny_batch):
    module = tiny_prism(retain_weight=0.5)
    module.model.eval()
    with torch.no_grad():
        at_init = module.distill_loss(tiny_batch, module.student_hidden(tiny_batch))
    assert set(at_init) == {"kl", "retain_kl", "loss"}
    # LoRA B = 0: the student is the base, and the retain teacher is the base without persona -> 0.
    assert at_init["retain_kl"].abs() < 1e-6
    _randomise_lora_b(module.model)
    with torch.no_grad():
        out = module.distill_loss(tiny_batch, module.student_hidden(tiny_batch))
    assert out["retain_kl"] > 1e-3
    torch.testing.assert_close(out["loss"], out["kl"] + 0.5 * out["retain_kl"])

    without = tiny_prism(retain_weight=0.0)
    assert "retain_kl" not in without.distill_loss(tiny_batch, without.student_hidden(tiny_batch))


def test_distill_loss_without_distill_rows_is_zero_with_a_graph(tiny_prism, tiny_backbone):
    module = tiny_prism()
    batch = Collator(ChatFormatter(tiny_backbone.tokenizer), PERSONAS)([ITEMS[2]])
    out = module.distill_loss(batch, module.student_hidden(batch))
    assert out["kl"].item() == 0.0 and out["kl"].requires_grad


def test_training_step_trains_lora_and_gate(tiny_prism, tiny_batch):
    module = tiny_prism()
    loss = module.training_step(tiny_batch, 0)
    loss.backward()
    lora_grads = [p.grad for n, p in module.model.named_parameters() if "lora_A" in n or "lora_B" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    assert any(g.abs().sum() > 0 for g in lora_grads)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.gate.parameters())
    base = [p for n, p in module.model.named_parameters() if "lora_" not in n]
    assert all(p.grad is None and not p.requires_grad for p in base)


def test_nan_logits_stop_training_naming_step_and_batch(tiny_prism, tiny_batch, monkeypatch):
    module = tiny_prism()
    original = module.student_hidden
    monkeypatch.setattr(module, "student_hidden", lambda batch: original(batch) * float("nan"))
    with pytest.raises(PrismError) as info:
        module.training_step(tiny_batch, 7)
    message = str(info.value)
    assert "global step 0" in message and "batch 7" in message and "d-math" in message
    # Finite losses pass; infinite ones are refused too.
    module.check_finite(torch.tensor(1.5), tiny_batch, 0)
    with pytest.raises(PrismError, match="batch 2"):
        module.check_finite(torch.tensor(float("inf")), tiny_batch, 2)


def test_checkpoint_keeps_only_trainable_weights_and_the_base_reference(tiny_prism, tiny_backbone):
    module = tiny_prism()
    _randomise_lora_b(module.model)
    checkpoint = {"state_dict": module.state_dict()}
    assert any("embed_tokens" in k for k in checkpoint["state_dict"])  # the full dict holds the base
    module.on_save_checkpoint(checkpoint)
    keys = list(checkpoint["state_dict"])
    assert keys and all("lora_" in k or k.startswith("gate.") for k in keys)
    n_lora = 2 * len(ALL_PROJECTIONS) * 2  # lora_A and lora_B on 7 projections of layers 1 and 2
    assert sum("lora_" in k for k in keys) == n_lora
    gate_keys = {k for k in keys if k.startswith("gate.")}
    assert gate_keys == {f"gate.{k}" for k in module.gate.state_dict()}  # the whole gate, calibration included
    assert {f"gate.mlp.net.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")} | {"gate.temperature"} <= gate_keys
    assert checkpoint["prism_base_model"] == tiny_backbone.reference

    # The kept weights restore the trained state.
    saved = {k: v.clone() for k, v in checkpoint["state_dict"].items()}
    _randomise_lora_b(module.model, seed=1)
    module.on_load_checkpoint(checkpoint)  # same base: accepted
    module.load_state_dict(saved, strict=False)
    current = module.state_dict()
    assert all(torch.equal(current[k], v) for k, v in saved.items())

    other = dict(checkpoint, prism_base_model={**tiny_backbone.reference, "fingerprint": "0123456789abcdef"})
    with pytest.raises(PrismError, match="made for base model"):
        module.on_load_checkpoint(other)
    with pytest.raises(PrismError, match="records no base model"):
        module.on_load_checkpoint({"state_dict": saved})


# --------------------------------------------------------------------------- real model: the persona matters
@pytest.mark.slow
def test_teacher_sees_the_persona_on_the_real_model(real_backbone):
    module = PrismModule(backbone=BackboneConfig())
    module.configure_model()
    assert module.model.get_base_model() is real_backbone.model
    n_layers = len(real_backbone.decoder_layers())
    lora_layers = {int(n.split(".layers.")[1].split(".")[0]) for n, _ in module.model.named_modules()
                   if n.endswith("lora_A")}
    assert lora_layers == set(range(1, n_layers))
    assert module.gate.hparams.hidden_size == real_backbone.model.config.hidden_size

    registry = PersonaRegistry.from_config(PersonaConfig(names=["math"]))
    persona = registry["math"].text
    formatter = ChatFormatter(real_backbone.tokenizer)
    assert len(formatter.tokenizer(persona)["input_ids"]) > 100  # a long persona
    item = _item("real-1", 1, "math", "What is 17 times 23?",
                 "Break it up: 17 x 23 = 17 x 20 + 17 x 3 = 340 + 51 = 391. So the product is 391.")

    with_persona = Collator(formatter, {p.name: p.text for p in registry})([item])
    no_persona = Collator(formatter, {"math": ""})([item])  # the reference-code bug: a persona-less teacher
    assert with_persona["teacher_ids"].shape[1] > no_persona["teacher_ids"].shape[1]
    with torch.no_grad():
        kl = module.distill_loss(with_persona, module.student_hidden(with_persona))["kl"]
        kl_none = module.distill_loss(no_persona, module.student_hidden(no_persona))["kl"]
    assert kl > 1e-3
    assert kl_none.abs() < 1e-6


# --------------------------------------------------------------------------- IntentGate alone
def _blobs(n: int, dim: int, seed: int, positive_share: float = 0.5) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=g) < positive_share).float()
    centre = torch.randn(dim, generator=torch.Generator().manual_seed(123))
    features = torch.randn(n, dim, generator=g) + (labels[:, None] * 2 - 1) * centre * 1.5
    return [{"features": f, "label": y} for f, y in zip(features, labels)]


def test_gate_mlp_shape():
    gate = IntentGate(hidden_size=24)
    layers = list(gate.mlp.net)
    assert [type(m) for m in layers] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert [(m.in_features, m.out_features) for m in layers if isinstance(m, nn.Linear)] == [(24, 128), (128, 64),
                                                                                            (64, 1)]
    x = torch.randn(5, 24)
    assert gate(x).shape == (5,)
    gate.eval()  # in training every call adds to the feature statistics (FeatureStandardizer)
    # The temperature divides the logits: P = sigmoid(mlp(x) / T).
    gate.temperature.fill_(2.0)
    torch.testing.assert_close(gate.probability(x), torch.sigmoid(gate.mlp(x) / 2.0))
    assert gate(x.to(torch.bfloat16)).dtype == torch.float32


def test_gate_trains_alone_on_separable_features():
    dim = 16
    L.seed_everything(0, workers=True)
    train = DataLoader(_blobs(256, dim, seed=1), batch_size=32, shuffle=True)
    val_items = _blobs(120, dim, seed=2, positive_share=0.25)  # imbalanced: balanced accuracy differs from acc
    val = DataLoader(val_items, batch_size=64)
    gate = IntentGate(hidden_size=dim)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=30, enable_progress_bar=False, logger=False,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(gate, train, val)
    metrics = trainer.callback_metrics
    assert float(metrics["val/gate_balanced_acc"]) > 0.9
    assert float(metrics["val/gate_auroc"]) > 0.9
    # The logged balanced accuracy is the mean per-class recall of the trained gate.
    feats = torch.stack([i["features"] for i in val_items])
    labels = torch.stack([i["label"] for i in val_items]).bool()
    with torch.no_grad():
        pred = gate.probability(feats) >= 0.5
    recall = [(pred[labels] == 1).float().mean(), (pred[~labels] == 0).float().mean()]
    assert float(metrics["val/gate_balanced_acc"]) == pytest.approx(float(sum(recall) / 2), abs=1e-6)


# --------------------------------------------------------------------------- gate metrics at 0.5 and deployed
# Raw logits and labels where a calibrated threshold and 0.5 disagree: sigmoid(logit / 2) >= 0.7 iff logit >= 1.69.
GATE_LOGITS = torch.tensor([3.0, 2.0, 1.0, 0.5, -0.5, -2.0, 1.2, 0.2])
GATE_LABELS = torch.tensor([1, 1, 0, 0, 0, 0, 1, 0])


def _accuracies(routed: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Accuracy and balanced accuracy (mean per-class recall) of 0/1 decisions, by hand."""
    routed, labels = routed.bool(), labels.bool()
    acc = float((routed == labels).float().mean())
    return acc, float(((routed[labels]).float().mean() + (~routed[~labels]).float().mean()) / 2)


def test_intent_gate_logs_accuracy_at_half_and_at_the_deployed_threshold():
    gate = IntentGate(hidden_size=1, dims=())
    with torch.no_grad():                                   # an identity MLP: the feature is the logit
        gate.mlp.net[0].weight.fill_(1.0)
        gate.mlp.net[0].bias.zero_()
    gate.temperature.fill_(2.0)
    gate.threshold.fill_(0.7)
    batch = [{"features": x.view(1), "label": y.float()} for x, y in zip(GATE_LOGITS, GATE_LABELS)]
    trainer = L.Trainer(accelerator="cpu", devices=1, enable_progress_bar=False, logger=False,
                        enable_checkpointing=False, enable_model_summary=False)
    metrics = trainer.validate(gate, DataLoader(batch, batch_size=3), verbose=False)[0]
    half, deployed = _accuracies(GATE_LOGITS >= 0, GATE_LABELS), _accuracies(GATE_LOGITS >= 2 * 0.8473, GATE_LABELS)
    assert (metrics["val/gate_acc"], metrics["val/gate_balanced_acc"]) == pytest.approx(half)       # 5/8, 0.7
    assert (metrics["val/gate_acc_deployed"], metrics["val/gate_balanced_acc_deployed"]) == pytest.approx(deployed)
    assert half != pytest.approx(deployed)                  # the two thresholds really disagree here


def test_prism_module_deployed_metrics_use_the_threshold_calibration_just_stored(tiny_prism, monkeypatch):
    """Callbacks' epoch-end hooks run first: the module reads the threshold and temperature GateCalibration set."""
    module = tiny_prism()
    ids = [f"i{n}" for n in range(len(GATE_LOGITS))]
    module.val_gate_outputs = [{"ids": ids[:5], "logits": GATE_LOGITS[:5], "labels": GATE_LABELS[:5]},
                               {"ids": ids[5:], "logits": GATE_LOGITS[5:], "labels": GATE_LABELS[5:]}]
    module.gate.temperature.fill_(2.0)                      # as GateCalibration leaves them
    module.gate.threshold.fill_(0.7)
    logged = {}
    monkeypatch.setattr(module, "log_dict",
                        lambda values, **kw: logged.update({k: float(v) for k, v in values.items()}))
    module.on_validation_epoch_end()
    half, deployed = _accuracies(GATE_LOGITS >= 0, GATE_LABELS), _accuracies(GATE_LOGITS >= 2 * 0.8473, GATE_LABELS)
    assert (logged["val/gate_acc"], logged["val/gate_balanced_acc"]) == pytest.approx(half)
    assert (logged["val/gate_acc_deployed"], logged["val/gate_balanced_acc_deployed"]) == pytest.approx(deployed)


# --------------------------------------------------------------------------- real model: training and padding
MATH_ITEMS = [
    _item(f"m-{n}", 1, "math", q, a, "ok")
    for n, (q, a) in enumerate([
        ("What is 12 times 14?", "12 x 14 = 12 x 10 + 12 x 4 = 120 + 48 = 168."),
        ("What is 25 squared?", "25 squared is 25 x 25 = 625."),
        ("How many degrees are in a triangle?", "The interior angles of a triangle add up to 180 degrees."),
        ("What is 81 divided by 9?", "81 / 9 = 9, because 9 x 9 = 81."),
        ("What is the square root of 144?", "The square root of 144 is 12, since 12 x 12 = 144."),
        ("What is 7 plus 8 times 2?", "Multiplication first: 8 x 2 = 16, then 7 + 16 = 23."),
    ])
]


@pytest.mark.slow
def test_a_few_real_training_steps_lower_the_held_out_kl(real_backbone):
    """Eight AdamW steps on four distill items lower KL(teacher with persona || student) on two held-out ones."""
    torch.manual_seed(0)
    module = PrismModule(backbone=BackboneConfig(), lora=LoraSettings(rank=8, alpha=16, dropout=0.0))
    module.configure_model()
    registry = PersonaRegistry.from_config(PersonaConfig(names=["math"]))
    collate = Collator(ChatFormatter(real_backbone.tokenizer), {p.name: p.text for p in registry}, max_length=320)
    train, held_out = collate(MATH_ITEMS[:4]), collate(MATH_ITEMS[4:])

    def held_out_kl() -> float:
        module.model.eval()
        with torch.no_grad():
            return float(module.distill_loss(held_out, module.student_hidden(held_out))["kl"])

    before = held_out_kl()
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=5e-4)
    module.model.train()
    for _ in range(8):
        optimizer.zero_grad()
        module.distill_loss(train, module.student_hidden(train))["loss"].backward()
        optimizer.step()
    after = held_out_kl()
    assert before > 1e-3 and after < 0.9 * before, (before, after)


@pytest.mark.slow
@torch.no_grad()
def test_training_features_under_right_padding_equal_inference_features_under_left_padding(real_backbone):
    """The gate trains on right-padded batches (Collator) and runs on left-padded ones (GatedModel): same features."""
    from prism_lightning.model.features import capture_layer0, gather_positions, layer0_features
    from prism_lightning.model.generation import left_pad

    formatter = ChatFormatter(real_backbone.tokenizer)
    items = [MATH_ITEMS[0], ITEMS[1], MATH_ITEMS[2]]
    batch = Collator(formatter, {"math": "You are a mathematician.", "coding": "You are a programmer."})(items)
    assert (batch["student_mask"] == 0).any(), "the training batch must be right-padded"
    with capture_layer0(real_backbone.model) as box:
        real_backbone.model(input_ids=batch["student_ids"], attention_mask=batch["student_mask"], use_cache=False)
    training = gather_positions(box["hidden"], batch["feature_pos"])
    prompts = [formatter.prompt_ids(item["query"]) for item in items]
    ids, mask = left_pad(prompts, real_backbone.tokenizer.pad_token_id, real_backbone.device)
    assert (mask == 0).any(), "the inference batch must be left-padded"
    inference = layer0_features(real_backbone.model, ids, mask, torch.full((len(items),), ids.shape[1] - 1))
    torch.testing.assert_close(training, inference, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- memory of the step (issue #11)
def saved_bytes(module: PrismModule, batch: dict) -> tuple[torch.Tensor, dict, int]:
    """One training step's loss, LoRA/gate gradients, and the bytes autograd kept for backward."""
    kept = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        kept[0] += tensor.numel() * tensor.element_size()
        return tensor

    torch.manual_seed(1)  # the same LoRA-dropout masks in both modes
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = module.training_step(batch, 0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    return loss.detach(), grads, kept[0]


def test_gradient_checkpointing_gives_the_same_loss_and_gradients_and_keeps_less(tiny_prism, tiny_batch):
    results = {}
    for on in (False, True):
        torch.manual_seed(0)  # identical LoRA A and gate initialisation
        # head_chunk 8: the LM head's logits are recomputed in backward too, so the decoder's activations dominate.
        module = tiny_prism(gradient_checkpointing=on, lora=LoraSettings(rank=4, alpha=8, dropout=0.1), head_chunk=8)
        _randomise_lora_b(module.model)
        assert module.model.get_base_model().is_activation_checkpointing is on
        results[on] = saved_bytes(module, tiny_batch)
    (loss_off, grads_off, kept_off), (loss_on, grads_on, kept_on) = results[False], results[True]
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-6, atol=1e-7)
    assert grads_on.keys() == grads_off.keys() and len(grads_on) > 4
    for name, grad in grads_off.items():
        torch.testing.assert_close(grads_on[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert kept_on < 0.5 * kept_off, (kept_on, kept_off)


def test_the_teacher_runs_only_on_rows_that_have_loss_tokens_and_gives_the_same_targets(tiny_prism, tiny_batch,
                                                                                        monkeypatch):
    module = tiny_prism()
    mask = tiny_batch["response_mask"] & (tiny_batch["label"] > 0.5)[:, None]
    seen = []
    decoder_hidden = module.decoder_hidden
    monkeypatch.setattr(module, "decoder_hidden", lambda ids, m: seen.append(ids.shape[0]) or decoder_hidden(ids, m))
    args = (tiny_batch["teacher_ids"], tiny_batch["teacher_mask"], tiny_batch["teacher_pos"], mask)
    values, index = module.teacher_targets(*args)
    assert seen == [1]  # one of the two rows is a retain row: no teacher forward for it
    monkeypatch.setattr("prism_lightning.training.modules.teacher_pass.world_size", lambda: 2)  # several ranks
    all_values, all_index = module.teacher_targets(*args)
    assert seen == [1, 2]
    torch.testing.assert_close(values, all_values, rtol=1e-5, atol=1e-5)
    assert torch.equal(index, all_index) and values.shape == (int(mask.sum()), 64)


def test_with_several_ranks_a_batch_without_loss_tokens_still_runs_the_teacher(tiny_prism, tiny_backbone,
                                                                                monkeypatch):
    """Under ZeRO-3 every rank must run the same forwards: a rank whose batch holds only retain rows runs the
    teacher (on no tokens) and gets a zero KL on the graph, instead of failing to concatenate nothing."""
    module = tiny_prism()
    batch = Collator(ChatFormatter(tiny_backbone.tokenizer), PERSONAS)([ITEMS[2]])  # a retain row only
    calls = []
    targets = module.teacher_targets
    monkeypatch.setattr(module, "teacher_targets", lambda *a: calls.append(1) or targets(*a))
    for part in ("teacher_pass", "distill_loss"):  # the teacher pass and the loss wiring both ask
        monkeypatch.setattr(f"prism_lightning.training.modules.{part}.world_size", lambda: 2)
    out = module.distill_loss(batch, module.student_hidden(batch))
    assert calls == [1] and out["kl"].item() == 0.0 and out["kl"].requires_grad
