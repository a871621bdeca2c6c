"""`data.teacher: cached`: the teacher's top-k computed once per distill item, resumable, invalidated by what it
reads, and giving the online teacher's loss."""

from __future__ import annotations

import pytest
import torch
from test_modules import ITEMS, PERSONAS, _item, _randomise_lora_b

from prism_lightning.model.chat import ChatFormatter
from prism_lightning.model.lora import LoraSettings
from prism_lightning.training import teacher_cache
from prism_lightning.training.datamodule import Collator
from prism_lightning.training.modules import PrismModule
from prism_lightning.training.teacher_cache import build_teacher_cache, stage_file
from prism_lightning.utils.errors import PrismError

MORE = [_item(f"d-{n}", 1, "math", f"Question {n}: how do I add 1/{n} and 1/{n + 1}?",
              f"Rewrite both over {n * (n + 1)}, add the numerators, and simplify: the sum is {2 * n + 1}/"
              f"{n * (n + 1)}.") for n in range(2, 7)]


def encode(backbone, items, personas=PERSONAS):
    collate = Collator(ChatFormatter(backbone.tokenizer), personas, max_length=128)
    return collate, [collate.encode_item(i) for i in items if i["label"] == 1]


def counted(monkeypatch) -> list[int]:
    """Rows the teacher actually ran on, per batch."""
    rows = []
    original = teacher_cache.teacher_records
    monkeypatch.setattr(teacher_cache, "teacher_records",
                        lambda model, pad, device, batch, k: rows.append(len(batch)) or original(model, pad, device,
                                                                                                  batch, k))
    return rows


def test_cached_targets_give_the_online_loss_and_gradients(tiny_backbone, tmp_path):
    torch.manual_seed(0)
    module = PrismModule(backbone=tiny_backbone.config, lora=LoraSettings(rank=4, alpha=8, dropout=0.0))
    module.configure_model()
    _randomise_lora_b(module.model)
    collate, encoded = encode(tiny_backbone, ITEMS + MORE)
    collate.teacher_cache = build_teacher_cache(tiny_backbone, encoded, 64, tmp_path, batch_size=3)
    batch = collate(ITEMS + MORE[:2])  # distill and retain rows, other padding than the cache's batches
    assert batch["teacher_values"].shape == (*batch["response_mask"].shape, 64)
    results = []
    for use_cache in (True, False):
        b = batch if use_cache else {k: v for k, v in batch.items() if not k.startswith("teacher_values")
                                     and k != "teacher_index"}
        module.zero_grad()
        loss = module.distill_loss(b, module.student_hidden(b))["loss"]
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in module.trainable_parameters()]))
    (cached, cached_grads), (online, online_grads) = results
    assert online > 1e-3
    torch.testing.assert_close(cached, online, rtol=1e-5, atol=1e-6)
    for got, want in zip(cached_grads, online_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_a_cached_step_runs_no_teacher_forward(tiny_backbone, tmp_path, monkeypatch):
    module = PrismModule(backbone=tiny_backbone.config, lora=LoraSettings(rank=4, alpha=8))
    module.configure_model()
    collate, encoded = encode(tiny_backbone, ITEMS)
    collate.teacher_cache = build_teacher_cache(tiny_backbone, encoded, 64, tmp_path, batch_size=4)
    monkeypatch.setattr(module, "teacher_targets", lambda *a: pytest.fail("teacher forward in a cached step"))
    module.training_step(collate(ITEMS), 0).backward()


def test_an_interrupted_cache_finishes_without_recomputing_and_a_changed_item_is_recomputed(tiny_backbone,
                                                                                           tmp_path, monkeypatch):
    _, encoded = encode(tiny_backbone, ITEMS + MORE)
    rows = counted(monkeypatch)
    build_teacher_cache(tiny_backbone, encoded[:3], 64, tmp_path, batch_size=2)  # a run killed after 3 items
    path = stage_file(tmp_path, tiny_backbone, 64)
    with path.open("a") as out:
        out.write('{"id": "torn')  # the write in flight when it was killed
    cache = build_teacher_cache(tiny_backbone, encoded, 64, tmp_path, batch_size=2)
    assert sum(rows) == len(encoded) and len(cache.records) == len(encoded)
    # A persona text changed: its items' teacher inputs changed, so exactly those are recomputed.
    changed = {**PERSONAS, "coding": PERSONAS["coding"] + " You always add type hints."}
    _, again = encode(tiny_backbone, ITEMS + MORE, changed)
    build_teacher_cache(tiny_backbone, again, 64, tmp_path, batch_size=2)
    assert sum(rows) == len(encoded) + 1  # d-code alone
    # Another k is another stage file; the full vocabulary is refused in one line.
    assert stage_file(tmp_path, tiny_backbone, 32) != path
    with pytest.raises(PrismError, match="top_k 0"):
        build_teacher_cache(tiny_backbone, encoded, 0, tmp_path, batch_size=2)


def test_a_cache_of_another_k_is_refused_by_the_step(tiny_backbone, tmp_path):
    module = PrismModule(backbone=tiny_backbone.config, lora=LoraSettings(rank=4, alpha=8), top_k=64)
    module.configure_model()
    collate, encoded = encode(tiny_backbone, ITEMS)
    collate.teacher_cache = build_teacher_cache(tiny_backbone, encoded, 16, tmp_path, batch_size=4)
    batch = collate(ITEMS)
    with pytest.raises(PrismError, match="top-16 .* model.top_k is 64"):
        module.distill_loss(batch, module.student_hidden(batch))


def test_prism_fit_with_a_cached_teacher_trains_as_the_online_one(smol_tokenizer, tmp_path):
    """Through the real CLI: the cache stage is written beside the corpus, reused by a rerun, and the per-step
    losses equal the online teacher's."""
    from test_cli_fit import fit_config, save_tiny_model, train_losses, write_corpus

    from prism_lightning.cli import main

    model = save_tiny_model(tmp_path / "model", smol_tokenizer, seed=0)
    corpus = write_corpus(tmp_path / "corpus", [1, 0, 0] * 4)
    main(["fit", "--config", str(fit_config(tmp_path / "online", model, corpus))])
    main(["fit", "--config", str(fit_config(tmp_path / "cached", model, corpus)), "--data.teacher", "cached"])
    stages = list((corpus / "stages").glob("teacher-*.jsonl"))
    assert len(stages) == 1 and len(stages[0].read_text().splitlines()) == 4  # every distill item, train + val
    online, cached = train_losses(tmp_path / "online"), train_losses(tmp_path / "cached")
    assert online.keys() == cached.keys() and len(online) >= 4
    for step, loss in online.items():
        assert cached[step] == pytest.approx(loss, rel=1e-4, abs=1e-6), step
    before = stages[0].stat().st_mtime_ns
    main(["fit", "--config", str(fit_config(tmp_path / "again", model, corpus)), "--data.teacher", "cached"])
    assert stages[0].stat().st_mtime_ns == before  # reused, not rewritten
