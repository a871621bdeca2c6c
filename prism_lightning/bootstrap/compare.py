"""Every judge protocol on the same pairs, side by side: the evidence for choosing ``data.judge.protocol``."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from rich.console import Console
from rich.table import Table

from prism_lightning.bootstrap.answers import sample_key
from prism_lightning.bootstrap.config import JudgeConfig
from prism_lightning.bootstrap.labels import (
    PROTOCOLS,
    SCORER,
    control_accuracy,
    controls_verdict,
    decide,
    judge_statistics,
    main_comparisons,
    quality_accuracy,
)
from prism_lightning.bootstrap.source_bias import cross_source_accuracy


def _query_labels(queries: list[dict], candidates: dict[str, list[str]], comparisons, labels: torch.Tensor,
                  samples: int = 1):
    """A query is distilled when one of its personas wins more than half its pairs (as ``label_queries`` decides)."""
    won = {c.id for c, lab in zip(comparisons, labels.tolist()) if lab}
    return torch.tensor([any(sum(f"{q['id']}/{sample_key(n, i)}" in won for i in range(samples)) > samples / 2
                             for n in candidates[q["id"]]) for q in queries])


def compare_protocols(queries: list[dict], candidates: dict[str, list[str]], pairs: list[tuple[dict, dict]],
                      scores_by_kind: dict[str, dict], config: JudgeConfig, samples: int = 1) -> dict:
    """Per protocol: both control accuracies and both cross-source directions with intervals, the share of corpus
    pairs preferring the baseline, distill rate, position bias, unreadable verdicts;
    and the share of queries on which each two protocols give the same label. All at margin 0, where every
    protocol's decision means "the persona answer is better"."""
    config = replace(config, margin=0.0)
    comparisons = main_comparisons(queries, candidates, samples=samples)
    rows, labels = {}, {}
    for protocol in PROTOCOLS:
        scores = scores_by_kind[SCORER[protocol]]
        d = decide(protocol, comparisons, scores, config)
        labels[protocol] = _query_labels(queries, candidates, comparisons, d.label, samples)
        row = {**judge_statistics(protocol, d), **control_accuracy(pairs, scores, config, protocol),
               **quality_accuracy(pairs, scores, config, protocol),
               **cross_source_accuracy(pairs, candidates, queries, scores, config, protocol, samples),
               "distill_rate": round(float(labels[protocol].float().mean()), 4) if queries else None}
        row["verdict"] = controls_verdict(row)
        rows[protocol] = row
    agreement = {a: {b: round(float((labels[a] == labels[b]).float().mean()), 4) if queries else None
                     for b in PROTOCOLS} for a in PROTOCOLS}
    return {"queries": len(queries), "pairs": len(comparisons), "control_pairs": len(pairs), "margin": 0.0,
            "protocols": rows, "agreement": agreement, "best": best_protocol(rows)}


def best_protocol(rows: dict[str, dict]) -> Optional[str]:
    """The protocol whose weaker control interval lies highest (lower bounds), if it lies above chance; a protocol
    biased toward one source of answers (``source_bias``) is never chosen, whatever its other controls say."""
    def floor(row: dict) -> float:
        return min(row["control_ci95"][0] if row["control_n"] else 0.0,
                   row["quality_ci95"][0] if row["quality_n"] else 0.0)
    fair = [p for p in rows if not rows[p].get("source_bias")]
    best = max(fair, key=lambda p: (floor(rows[p]), rows[p]["control_accuracy"] or 0.0), default=None)
    return best if best is not None and floor(rows[best]) > 0.5 else None


def _accuracy_cell(row: dict, prefix: str) -> str:
    acc, (low, high) = row[f"{prefix}_accuracy"], row[f"{prefix}_ci95"]
    return "–" if acc is None else f"{acc:.0%} ({100 * low:.0f}–{100 * high:.0f})"


def print_comparison(compare: dict, console: Optional[Console] = None) -> None:
    """The protocol table and the agreement matrix, with the protocol the evidence points to."""
    console = console or Console()
    if not console.is_terminal and console.width < 100:  # logs: room for every column, never cut names
        console = Console(file=console.file, width=100)
    table = Table(title=f"judge protocols on the same {compare['pairs']} pairs ({compare['queries']} queries, "
                        f"margin 0); control accuracy (95% CI) on {compare['control_pairs']} pairs of each kind")
    for col in ("protocol", "relevance", "quality", "persona>bad base", "base>bad persona", "prefers base",
                "distill", "A/B bias", "unread", "controls"):
        table.add_column(col, justify="left" if col == "protocol" else "right", no_wrap=True)
    for protocol, row in compare["protocols"].items():
        bias = "n/a" if row["position_bias_rate"] is None else f"{row['position_bias_rate']:.0%}"
        rate = "–" if row["distill_rate"] is None else f"{row['distill_rate']:.0%}"
        base = "–" if row.get("prefers_baseline") is None else f"{row['prefers_baseline']:.0%}"
        verdict = f"{row['verdict']}, leans {row['source_bias']}" if row.get("source_bias") else row["verdict"]
        table.add_row(protocol, _accuracy_cell(row, "control"), _accuracy_cell(row, "quality"),
                      _accuracy_cell(row, "cross_persona"), _accuracy_cell(row, "cross_baseline"), base, rate, bias,
                      str(row["unparseable"]), verdict)
    console.print(table)
    agree = Table(title="agreement of the labels (share of queries labelled alike)")
    agree.add_column("")
    for protocol in compare["agreement"]:
        agree.add_column(protocol, justify="right")
    for a, row in compare["agreement"].items():
        agree.add_row(a, *("–" if v is None else f"{v:.0%}" for v in row.values()))
    console.print(agree)
    best = compare.get("best")
    biased = [p for p, row in compare["protocols"].items() if row.get("source_bias")]
    if biased:
        console.print("Not eligible, biased toward one source (the two cross-source directions differ beyond their "
                      "intervals): " + ", ".join(f"{p} (toward the {compare['protocols'][p]['source_bias']} answers)"
                                                for p in biased) + ".")
    console.print(f"Protocol whose control intervals lie highest, among those without a source bias: {best} "
                  f"(data.judge.protocol={best})." if best else
                  "No protocol without a source bias has both control intervals above chance: none of these judges "
                  "can be told from noise on this model; set data.judge.model to a stronger judge.")
