"""Data under several ranks, without starting processes: the balanced sampler's per-rank draws, loaders Lightning leaves
alone, and the gate outputs gathered from the ranks' shares of the held-out split."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.trainer.states import RunningStage
from torch.utils.data import DistributedSampler

from prism_lightning.training.datamodule import BalancedSampler, BootstrapDataModule
from prism_lightning.training.modules.prism import merge_rank_outputs

LABELS = [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0]  # 2 of 11: the minority is resampled


def draws(world: int, epoch: int, seed: int = 3) -> list[list[int]]:
    samplers = [BalancedSampler(LABELS, seed, world, rank) for rank in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
    return [list(s) for s in samplers]


def test_one_process_draws_what_it_always_drew():
    weights = torch.tensor([1 / 2 if y else 1 / 9 for y in LABELS], dtype=torch.double)
    for epoch in range(3):
        old = torch.multinomial(weights, len(LABELS), True,
                                generator=torch.Generator().manual_seed(3 * 100_003 + epoch)).tolist()
        assert draws(1, epoch) == [old]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_draw_different_shares_of_one_global_draw(world):
    shares = draws(world, epoch=0)
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) == -(-len(LABELS) // world)  # equal batch counts
    assert shares[0] != shares[1]
    # Interleaved, the shares are one seeded global draw: what a run with `world` ranks sees in total.
    weights = torch.tensor([1 / 2 if y else 1 / 9 for y in LABELS], dtype=torch.double)
    total = len(shares[0]) * world
    glob = torch.multinomial(weights, total, True, generator=torch.Generator().manual_seed(3 * 100_003)).tolist()
    assert [shares[i % world][i // world] for i in range(total)] == glob


def test_every_rank_redraws_each_epoch_and_a_resumed_run_draws_the_same():
    epoch0, epoch1 = draws(2, 0), draws(2, 1)
    assert all(a != b for a, b in zip(epoch0, epoch1))
    assert draws(2, 1) == epoch1  # a fresh sampler at the resumed epoch: the same draws
    assert sum(LABELS[i] for share in epoch0 + epoch1 for i in share) > 4  # the minority is resampled


def test_a_rank_outside_the_world_is_refused():
    with pytest.raises(ValueError, match="rank 2 outside 0..1"):
        BalancedSampler(LABELS, 0, num_replicas=2, rank=2)


def items(n: int) -> list[dict]:
    return [{"id": f"i{k}", "label": int(k % 3 == 0)} for k in range(n)]


@pytest.mark.parametrize("balance", [True, False])
def test_lightning_keeps_our_samplers_on_two_ranks(balance, monkeypatch):
    """With devices 2 Lightning would wrap a custom sampler (re-shuffling the draw, never passing set_epoch on)."""
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False)
    data = BootstrapDataModule(bootstrap=False, balance=balance)
    data.trainer = SimpleNamespace(world_size=2, global_rank=1)
    data.train_items, data.val_items = items(9), items(5)
    monkeypatch.setattr(data, "collator", lambda: list)
    connector = trainer._data_connector
    for loader, stage in ((data.train_dataloader(), RunningStage.TRAINING),
                          (data.val_dataloader(), RunningStage.VALIDATING)):
        assert isinstance(loader.sampler, DistributedSampler) and loader.sampler.rank == 1
        assert connector._prepare_dataloader(loader, shuffle=stage == RunningStage.TRAINING, mode=stage) is loader
    val = data.val_dataloader().sampler
    assert list(val) == [1, 3, 0]  # rank 1 of 2 over 5 items, in order, padded with a repeat of item 0
    assert len(data.train_dataloader().sampler) == 5


def rank_outputs(ids: list[str], batch: int) -> list[dict]:
    values = {i: float(i[1:]) for i in ids}
    return [{"ids": ids[k:k + batch], "logits": torch.tensor([values[i] for i in ids[k:k + batch]]),
             "labels": torch.tensor([int(values[i]) % 2 for i in ids[k:k + batch]])}
            for k in range(0, len(ids), batch)]


def test_gathered_gate_outputs_are_the_split_once_in_order():
    split = [f"i{k}" for k in range(5)]
    # DistributedSampler(shuffle=False) over 5 items on 2 ranks: rank 0 gets 0, 2, 4; rank 1 gets 1, 3 and 0 again.
    per_rank = [rank_outputs(["i0", "i2", "i4"], 2), rank_outputs(["i1", "i3", "i0"], 2)]
    merged = merge_rank_outputs(per_rank)
    assert merged["ids"] == split
    assert merged["logits"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert merged["labels"].tolist() == [0, 1, 0, 1, 0]
    one = merge_rank_outputs([rank_outputs(split, 2)])
    assert one["ids"] == split and torch.equal(one["logits"], merged["logits"])
    assert merge_rank_outputs([[], []])["ids"] == []


@pytest.mark.parametrize("balance", [True, False])
def test_the_training_loader_resumes_inside_the_epoch_it_names_only(balance):
    """Unit view of mid-epoch resume: the position is (epoch, batches trained) and applies to that epoch alone."""
    data = BootstrapDataModule(bootstrap=False, balance=balance)
    data.trainer = SimpleNamespace(world_size=2, global_rank=1)
    data.train_items = items(13)
    data.collator = lambda: list
    loader = data.train_dataloader()
    loader.sampler.set_epoch(2)
    whole = [[row["id"] for row in batch] for batch in loader]
    loader.sampler.set_epoch(2)
    trained = iter(loader)
    first = [[row["id"] for row in next(trained)] for _ in range(2)]
    position = data.state_dict()
    assert position == {"train_position": {"epoch": 2, "batches": 2}}

    resumed = BootstrapDataModule(bootstrap=False, balance=balance)
    resumed.trainer, resumed.train_items, resumed.collator = data.trainer, data.train_items, data.collator
    resumed.load_state_dict(position)  # before the loader exists (DDP order)
    loader = resumed.train_dataloader()
    loader.sampler.set_epoch(2)
    rest = [[row["id"] for row in batch] for batch in loader]
    assert first + rest == whole and len(rest) == len(whole) - 2
    assert resumed.state_dict()["train_position"] == {"epoch": 2, "batches": len(whole)}  # skipped ones count
    loader.sampler.set_epoch(3)
    assert len(list(loader)) == len(whole)  # the next epoch is whole

    late = BootstrapDataModule(bootstrap=False, balance=balance)
    late.trainer, late.train_items, late.collator = data.trainer, data.train_items, data.collator
    loader = late.train_dataloader()
    late.load_state_dict(position)  # after the loader exists (DeepSpeed restores after setup)
    loader.sampler.set_epoch(3)
    assert len(list(loader)) == len(whole)  # a position for epoch 2 is dropped at epoch 3
