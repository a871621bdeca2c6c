"""RoutingReport: the gate's routing rate per persona and per persona category on the val split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback


class RoutingReport(Callback):
    """Logs ``routing/<persona>``, ``routing/category/<category>`` and, for contexts, ``routing/intent/inside`` and
    ``routing/intent/outside``, and saves them per epoch as JSON."""

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Routing rates of this validation pass, grouped by the persona that wrote each query."""
        corpus = getattr(trainer.datamodule, "corpus", None)
        if trainer.sanity_checking or corpus is None:
            return
        held = pl_module.held_out_gate()  # the whole split, from every rank
        if not held["ids"]:
            return
        by_id = {item["id"]: item for item in corpus.items}
        threshold = float(pl_module.gate.threshold)
        temperature = float(pl_module.gate.temperature)
        groups: dict[str, list[float]] = {}
        routed = (torch.sigmoid(held["logits"] / temperature) >= threshold).float().tolist()
        for item_id, r in zip(held["ids"], routed):
            persona = by_id[item_id]["persona"]
            groups.setdefault(persona, []).append(r)
            category = (corpus.manifest.get("categories") or {}).get(persona)
            if category:
                groups.setdefault(f"category/{category}", []).append(r)
            intent = by_id[item_id].get("intent")  # contexts: questions they answer (inside) or not (outside)
            if intent:
                groups.setdefault(f"intent/{intent}", []).append(r)
        rates = {k: sum(v) / len(v) for k, v in sorted(groups.items())}
        pl_module.log_dict({f"routing/{k}": v for k, v in rates.items()})
        if trainer.is_global_zero:
            directory = Path(trainer.default_root_dir) / "routing"
            directory.mkdir(parents=True, exist_ok=True)
            (directory / f"epoch{trainer.current_epoch}.json").write_text(
                json.dumps({"threshold": threshold, "rates": rates, "n": {k: len(v) for k, v in groups.items()}},
                           indent=1))
