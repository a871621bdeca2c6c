"""An example user callback: shows how to hook into a PRISM run from YAML without touching the library.

```yaml
trainer:
  callbacks:
    - class_path: prism_lightning.training.callbacks.example.HookRecorder
      init_args: {path: runs/hooks.json}
```
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback


class HookRecorder(Callback):
    """Records which Lightning hooks fired, with the step and the latest training loss, into a JSON file.

    Args:
        path: where to write the record at the end of the run.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.events: list[dict] = []

    def _record(self, hook: str, trainer: Any) -> None:
        loss = trainer.callback_metrics.get("train/loss")
        self.events.append({"hook": hook, "step": trainer.global_step,
                            "train_loss": None if loss is None else float(loss)})

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Fit begins."""
        self._record("on_fit_start", trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """A training epoch ended."""
        self._record("on_train_epoch_end", trainer)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        """A validation pass ended."""
        self._record("on_validation_end", trainer)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Fit ended: write the record."""
        self._record("on_fit_end", trainer)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.events, indent=1))
