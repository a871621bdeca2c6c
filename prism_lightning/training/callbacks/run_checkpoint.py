"""RunCheckpoint: a resumable ``last.ckpt`` at every epoch end (and every N steps), under the run's root."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that always keeps ``last.ckpt`` current, so a killed fit resumes where it stopped.

    Lightning 2.6 writes ``last.ckpt`` at an epoch's end only when a top-k checkpoint was saved at that step,
    i.e. never with ``save_top_k: 0``; then a kill loses every epoch. Here ``last.ckpt`` is written at each
    train epoch's end (after validation and calibration, so their results are in it) whatever ``save_top_k``
    is. Writes go through Lightning's atomic save (temporary file, then move), so a kill during a write leaves
    the previous checkpoint intact; under DeepSpeed ``last.ckpt`` is a directory of per-rank shards, likewise
    written beside it and then moved into place (``prism_lightning.distributed.strategies.PrismDeepSpeedStrategy``). ``dirpath`` left unset means ``<trainer.default_root_dir>/checkpoints``
    (set by the ``prism`` CLI). Every ModelCheckpoint argument is accepted; ``every_n_train_steps`` adds
    step-level saves.
    """

    def __init__(self, *args: Any, save_last: bool = True, save_top_k: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, save_last=save_last, save_top_k=save_top_k, **kwargs)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Lightning's own saves, then ``last.ckpt`` if this epoch's end is not saved yet."""
        super().on_train_epoch_end(trainer, pl_module)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
