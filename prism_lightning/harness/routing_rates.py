"""Per-task routing rates of an lm-eval run: which route each distinct prompt took and the gate's probabilities."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from prism_lightning.utils.stats import wilson_interval

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


@dataclass
class RoutingLog:
    """Every request's task, prompt and route. Rates count distinct prompts per task: lm-eval sends one request per
    answer choice of a multiple-choice question, all with the same prompt and so the same route."""

    records: list[tuple[str, tuple[int, ...], str, float]] = field(default_factory=list)

    def add(self, task: Optional[str], prompt: tuple[int, ...], route: str, probability: float) -> None:
        """Record one request (``route``: ``base``, ``adapter`` or, with K adapters, the adapter's name; NaN
        probability: no gate ran)."""
        self.records.append((task or "(no task)", prompt, route, probability))

    def rates(self) -> dict[str, dict]:
        """Per task: requests, distinct prompts, share of prompts per route with a Wilson 95 % interval, and the
        gate probability's quantiles over the prompts (absent when a fixed route ran no gate)."""
        out: dict[str, dict] = {}
        for task in sorted({r[0] for r in self.records}):
            rows = [r for r in self.records if r[0] == task]
            prompts = {r[1]: (r[2], r[3]) for r in rows}
            n = len(prompts)
            routes: dict[str, dict] = {}
            for route in sorted({v[0] for v in prompts.values()}, key=lambda name: (name != "base", name)):
                k = sum(v[0] == route for v in prompts.values())
                low, high = wilson_interval(k, n)
                routes[route] = {"prompts": k, "share": k / n,
                                                              "ci95": [round(low, 4), round(high, 4)]}
            entry = {"requests": len(rows), "prompts": n, "routes": routes}
            probs = torch.tensor([v[1] for v in prompts.values() if not math.isnan(v[1])])
            if len(probs):
                entry["gate_probability"] = {f"p{int(q * 100)}": round(float(torch.quantile(probs, q)), 4)
                                             for q in QUANTILES}
            out[task] = entry
        return out

    def write(self, path: Path, route: str, export: str) -> Path:
        """The rates as JSON at ``path`` (what route the run asked for and which export answered)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"export": export, "route": route, "counted": "distinct prompts per task",
                                    "tasks": self.rates()}, indent=2) + "\n")
        return path


def rates_table(rates: dict[str, dict], route: str):
    """A rich table: per task, prompts, each route's share with its interval, and gate probability quantiles."""
    from rich.table import Table  # lazy: only the command prints

    names = sorted({name for entry in rates.values() for name in entry["routes"]}, key=lambda n: (n != "base", n))
    table = Table(title=f"Routing per task (route={route}; shares of distinct prompts, 95 % Wilson interval)")
    table.add_column("task", no_wrap=True)
    table.add_column("prompts", justify="right")
    for name in names:
        table.add_column(f"→ {name}", justify="right")
    table.add_column("gate p10/p50/p90", justify="right")
    for task, entry in rates.items():
        cells = []
        for name in names:
            r = entry["routes"].get(name)
            cells.append("0 %" if r is None else
                         f"{100 * r['share']:.1f} % ({100 * r['ci95'][0]:.1f}–{100 * r['ci95'][1]:.1f})")
        q = entry.get("gate_probability")
        quantiles = "no gate ran" if q is None else f"{q['p10']:.3f} / {q['p50']:.3f} / {q['p90']:.3f}"
        table.add_row(task, str(entry["prompts"]), *cells, quantiles)
    return table
