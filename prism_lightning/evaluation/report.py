"""Write metrics.json, PNG plots and report.md; print the Table-1-style table."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table


def print_table(metrics: dict, console: Console | None = None) -> None:
    """Subcategories × rows with Overall last (the paper's Table 1, transposed to fit a terminal)."""
    console = console or Console(width=None if Console().is_terminal else 160)  # logs: never cut names
    rows = metrics["rows"]
    table = Table(title="PRISM benchmark (0–100; MT-Bench ×10)")
    table.add_column("subcategory", no_wrap=True, min_width=max(len(x) for x in metrics["subcategories"] or [""]))
    table.add_column("items", justify="right")
    for name in rows:
        table.add_column(name, justify="right")
    for s in metrics["subcategories"]:
        table.add_row(s, str(metrics["counts"].get(s, "")), *[_fmt(row["scores"].get(s)) for row in rows.values()])
    table.add_row("Overall", "", *[_fmt(row["overall"]) for row in rows.values()], style="bold", end_section=True)
    console.print(table)
    pref = metrics.get("preference")
    if pref:
        console.print(f"preference PRISM vs Base: win rate {_fmt(pref['win_rate'])}% (n = {pref['n']}, 95% CI "
                      f"{_fmt(pref['ci95'][0])}–{_fmt(pref['ci95'][1])}); corpus judge control accuracy "
                      f"{pref.get('judge_control_accuracy')} (n = {pref.get('judge_control_n')})")
    corr = metrics.get("routing_analysis")
    if corr:
        console.print(f"routing vs persona effect: Pearson {_fmt(corr['pearson'], 3)}, Spearman "
                      f"{_fmt(corr['spearman'], 3)} over {corr['n']} subcategories")


def _fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def plot(metrics: dict, directory: Path) -> list[Path]:
    """Bar chart of rows × subcategories and the routing scatter; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    subcats, rows = metrics["subcategories"], metrics["rows"]
    fig, ax = plt.subplots(figsize=(max(8, len(subcats) * 0.9), 4.5))
    width = 0.8 / max(1, len(rows))
    for i, (name, row) in enumerate(rows.items()):
        values = [row["scores"].get(s, float("nan")) for s in subcats]
        ax.bar([j + i * width for j in range(len(subcats))], values, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(subcats))], subcats, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("score (0–100)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(directory / "scores.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    corr = metrics.get("routing_analysis")
    if corr and corr["n"]:
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.scatter(corr["persona_effect"], corr["routing_rate"])
        for x, y, label in zip(corr["persona_effect"], corr["routing_rate"], corr["subcategories"]):
            ax.annotate(label, (x, y), fontsize=6)
        ax.set_xlabel("persona effect (Expert − Base)")
        ax.set_ylabel("PRISM routing rate to adapter")
        ax.set_title(f"Pearson {_fmt(corr['pearson'], 2)}, Spearman {_fmt(corr['spearman'], 2)}")
        fig.tight_layout()
        paths.append(directory / "routing.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def write_report(metrics: dict, directory: Path) -> Path:
    """metrics.json + plots + report.md embedding them."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.json").write_text(json.dumps(_strict_json(metrics), indent=1, allow_nan=False))
    pngs = plot(metrics, directory)
    subcats = metrics["subcategories"]
    lines = ["# PRISM benchmark report", "", f"Model: `{metrics['model']}`. Subcategories present: "
             f"{', '.join(subcats)} ({len(subcats)}). Overall = mean of these on 0–100 (MT-Bench ×10).", "",
             "| row | " + " | ".join(subcats) + " | Overall |", "|---" * (len(subcats) + 2) + "|"]
    for name, row in metrics["rows"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(row["scores"].get(s)) for s in subcats) +
                     f" | {_fmt(row['overall'])} |")
    lines += ["", "Items per subcategory (MT-Bench: turns): " +
              ", ".join(f"{k} {v}" for k, v in metrics["counts"].items()), ""]
    unread = {k: v for k, v in metrics.get("unreadable", {}).items() if v}
    lines.append("Judge verdicts that could not be read (excluded, never scored): " +
                 (", ".join(f"{k} {v}" for k, v in unread.items()) if unread else "none") + ".")
    if metrics.get("preference"):
        p = metrics["preference"]
        lines += ["", f"Preference, PRISM vs Base (held-out corpus queries, both orders, debiased): win rate "
                      f"{_fmt(p['win_rate'])} % (n = {p['n']}, 95 % CI {_fmt(p['ci95'][0])}–{_fmt(p['ci95'][1])}). "
                      f"The corpus judge's control accuracy was {p.get('judge_control_accuracy')} "
                      f"(n = {p.get('judge_control_n')}); a win rate means little when that is near chance."]
    if metrics.get("settings"):
        st, cache = metrics["settings"], metrics.get("cache") or {}
        lines += ["", f"Settings: judge {st['judge']}; decoding {st['decoding']}; safety generations capped at "
                      f"{st['safety_max_new_tokens']} new tokens; MMLU n = {st['mmlu_n']}, seed {st['seed']}. "
                      f"Wall time {metrics.get('seconds')} s; prompts computed {cache.get('computed')}, reused "
                      f"{cache.get('reused')} (PRISM rows take the Base or Ungated result of the same prompt)."]
    lines += ["", *[f"![{p.stem}]({p.name})" for p in pngs], ""]
    (directory / "report.md").write_text("\n".join(lines))
    return directory / "report.md"


def _strict_json(value):
    """NaN (a subcategory with nothing readable) becomes null: metrics.json stays valid JSON for any reader."""
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (bool, int, float, str)):
        value = value.item()  # a tensor or numpy scalar
    return None if isinstance(value, float) and math.isnan(value) else value
