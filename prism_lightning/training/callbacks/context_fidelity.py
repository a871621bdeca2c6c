"""ContextFidelity: at the end of a fit, how much of a context's checkable content the gated adapter carries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from rich.console import Console
from rich.table import Table

from prism_lightning.contexts.fidelity import Probe, load_probes, measure_fidelity
from prism_lightning.contexts.personas import PersonaRegistry
from prism_lightning.distributed.collectives import zero3_partitioned
from prism_lightning.utils.errors import PrismError
from prism_lightning.utils.paths import InputFile

REPORT_DIR = "context_fidelity"


class ContextFidelity(Callback):
    """Probe accuracy of Base (no context), Base + context, PRISM (no context) and the adapter always on, with
    95 % intervals, and the gate's opening rate on probes vs unrelated questions; printed and written to
    ``<default_root_dir>/context_fidelity/<context>.json``. In a K-way run the context's own adapter is the one
    measured (and the gate must open that one); add one callback per context.

    Args:
        probes: JSONL of ``{"question", "choices", "answer", "kind": "probe"}`` and ``{"question", "kind":
            "unrelated"}`` rows (``python -m prism_lightning.contexts.fixtures`` writes them).
        context: the registry name of the context the probes test; default: the run's only non-persona context.
        batch_size: sequences per forward.
    """

    def __init__(self, probes: InputFile, context: Optional[str] = None, batch_size: int = 16) -> None:
        self.probes_path, self.context, self.batch_size = Path(probes), context, batch_size
        self.probes: list[Probe] = load_probes(self.probes_path)  # a bad file fails before any training
        self.result: Optional[dict] = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Resolve which context the probes test; an unknown or ambiguous name fails before training."""
        config = getattr(trainer.datamodule, "persona_config", None)
        if config is None:
            return
        registry = PersonaRegistry.from_config(config)
        if self.context is None:
            contexts = [p.name for p in registry if p.kind != "persona"]
            if len(contexts) != 1:
                raise PrismError(f"ContextFidelity: set init_args.context to one of {', '.join(registry.names)} "
                                 f"(the run has {len(contexts)} non-persona contexts)")
            self.context = contexts[0]
        registry[self.context]  # noqa: B018 — an unknown name is a one-line error naming the registry

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Measure on the trained weights (rank 0; under ZeRO-3 the forwards would need every rank: skipped)."""
        if zero3_partitioned(pl_module):
            rank_zero_warn("ContextFidelity: skipped under ZeRO-3; run it on the export in one process")
            return
        if not trainer.is_global_zero:
            return
        persona = PersonaRegistry.from_config(trainer.datamodule.persona_config)[self.context]
        was_training = pl_module.model.training
        pl_module.model.eval()
        adapter = pl_module.adapter_names[trainer.datamodule.adapter_of.get(self.context, 0)]
        # A kind with a fixed placement (memory, tools, passages) keeps it; a persona goes where the run put it.
        placement = persona.placement or trainer.datamodule.placement
        result = measure_fidelity(pl_module.gated(), persona.text, self.probes, placement, self.batch_size, adapter)
        pl_module.model.train(was_training)
        self.result = {"context": self.context, "kind": persona.kind, "probes": str(self.probes_path), **result}
        path = Path(trainer.default_root_dir) / REPORT_DIR / f"{self.context}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.result, indent=1), encoding="utf-8")
        print_fidelity(self.result, path)


def print_fidelity(result: dict, path: Path, console: Optional[Console] = None) -> None:
    """The fidelity table: one line per row, then the routing rates."""
    console = console or Console(stderr=True)
    table = Table(title=f"Context fidelity — {result['context']} ({result['kind']}, {result['context_tokens']} "
                        f"tokens), {result['n_probes']} probes, chance {100 * result['chance']:.0f} %")
    for column in ("row", "probe accuracy", "95 % CI"):
        table.add_column(column)
    for name, row in result["rows"].items():
        table.add_row(name, f"{100 * row['rate']:.0f} % ({row['k']}/{row['n']})",
                      f"{100 * row['ci95'][0]:.0f}–{100 * row['ci95'][1]:.0f} %")
    console.print(table)
    for kind, r in result["routing"].items():
        if r["n"]:
            console.print(f"gate opens on {kind} questions: {100 * r['rate']:.0f} % ({r['k']}/{r['n']}, 95 % CI "
                          f"{100 * r['ci95'][0]:.0f}–{100 * r['ci95'][1]:.0f} %) at threshold {result['threshold']:.3f}")
    console.print(f"context fidelity written to {path}")
