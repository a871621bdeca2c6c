"""``--ckpt_path best``: the best checkpoint by the monitored metric that ModelCheckpoint recorded, or one clear line."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from prism_lightning.cli import resolve_checkpoint
from prism_lightning.utils.errors import PrismError

# The monitored value per epoch: epoch 1 is best (lowest), epoch 2 is newer and kept too (top 2).
SCORES = [3.0, 1.0, 2.0]


class ScoredModel(BoringModel):
    """BoringModel logging a fixed ``val/score`` per epoch."""

    def on_validation_epoch_end(self) -> None:
        self.log("val/score", SCORES[self.current_epoch])


def _fit(root: Path, checkpoint: ModelCheckpoint) -> None:
    trainer = L.Trainer(default_root_dir=root, max_epochs=len(SCORES), limit_train_batches=2, limit_val_batches=1,
                        callbacks=[checkpoint], logger=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, accelerator="cpu", devices=1)
    trainer.fit(ScoredModel())


def test_best_is_the_best_by_the_monitored_metric_not_the_newest(tmp_path):
    directory = tmp_path / "checkpoints"
    _fit(tmp_path, ModelCheckpoint(dirpath=directory, monitor="val/score", mode="min", save_top_k=2, save_last=True,
                                   filename="{epoch}"))
    assert sorted(p.name for p in directory.glob("epoch=*.ckpt")) == ["epoch=1.ckpt", "epoch=2.ckpt"]
    assert resolve_checkpoint(str(tmp_path), "best") == directory / "epoch=1.ckpt"      # the newest is epoch=2
    assert resolve_checkpoint(str(tmp_path), "last") == directory / "last.ckpt"


def test_best_without_a_monitored_metric_is_refused_in_one_line(tmp_path):
    _fit(tmp_path, ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_top_k=1, save_last=True))
    with pytest.raises(PrismError) as err:
        resolve_checkpoint(str(tmp_path), "best")
    message = str(err.value)
    assert message.startswith("ckpt_path best: no ModelCheckpoint") and "monitors a metric" in message
    assert "\n" not in message


def test_best_found_beside_the_newest_checkpoint_after_the_run_moved(tmp_path):
    old = tmp_path / "old"
    _fit(old, ModelCheckpoint(dirpath=old / "checkpoints", monitor="val/score", mode="min", save_top_k=1,
                              save_last=True, filename="{epoch}"))
    moved = tmp_path / "moved"
    old.rename(moved)
    assert resolve_checkpoint(str(moved), "best") == moved / "checkpoints" / "epoch=1.ckpt"


def test_best_without_checkpoints_names_the_directory(tmp_path):
    with pytest.raises(PrismError, match="no best checkpoint under"):
        resolve_checkpoint(str(tmp_path), "best")
