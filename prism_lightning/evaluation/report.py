"""Write metrics.json, PNG plots and report.md; print the Table-1-style table."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from prism_lightning.evaluation.judge_controls import judge_line


def print_table(metrics: dict, console: Console | None = None) -> None:
    """Subcategories × rows with Overall last (the paper's Table 1, transposed to fit a terminal)."""
    console = console or Console(width=None if Console().is_terminal else 160)  # logs: never cut names
    rows = metrics["rows"]
    table = Table(title="PRISM benchmark (0–100; MT-Bench ×10; 95% bootstrap CI; items every row scored)")
    table.add_column("subcategory", no_wrap=True, min_width=max(len(x) for x in metrics["subcategories"] or [""]))
    table.add_column("items", justify="right")
    for name in rows:
        table.add_column(name, justify="right")
    controls = metrics.get("judge_controls") or {}
    if controls:
        table.add_column("judge control", justify="right")
    for s in metrics["subcategories"]:
        judged = [judge_cell(controls, s)] if controls else []
        table.add_row(s, _items(metrics, s), *[_cell(row["scores"].get(s), row.get("intervals", {}).get(s))
                                               for row in rows.values()], *judged)
    table.add_row("Overall", "", *[_cell(row["overall"], row.get("overall_ci95")) for row in rows.values()],
                  *([""] if controls else []), style="bold", end_section=True)
    console.print(table)
    for line in summary_lines(metrics):
        console.print(line)


def summary_lines(metrics: dict) -> list[str]:
    """The sentences under the table: what Overall averages, preference, routing analysis, turn-2 routing."""
    lines = [_overall_line(metrics), *routing_rate_lines(metrics), *agreement_lines(metrics)]
    for name, control in (metrics.get("judge_controls") or {}).items():
        lines.append(judge_line(name.capitalize(), control))
    pref = metrics.get("preference")
    if pref:
        lines.append(_preference_line(pref))
    if metrics.get("routing_analysis"):
        lines.append(_routing_line(metrics["routing_analysis"]))
    if (metrics.get("settings") or {}).get("mt_bench_turn2_routing"):
        lines.append(_routing_settings_line(metrics["settings"]))
    return lines


def _routing_settings_line(settings: dict) -> str:
    return (f"MT-Bench turn 2 routing: {settings.get('mt_bench_turn2_routing')}. Expert rows place the persona as the "
            f"run trained: {settings.get('placement')}. PRISM routes at the deployed gate threshold "
            f"{_fmt(settings.get('gate_threshold'), 4)}.")


def _overall_line(metrics: dict) -> str:
    kept = metrics.get("overall_subcategories", metrics["subcategories"])
    left = metrics.get("left_out", [])
    measure = (metrics.get("settings") or {}).get("refusal_measure")
    safety = (f" Safety subcategories enter Overall by {MEASURE_WORDS[measure]}; the other measure is shown beside "
              f"them, not averaged." if measure and any(k.startswith("Safety/") for k in kept) else "")
    return (f"Overall = mean of the {len(kept)} subcategories every row scored; left out: "
            f"{', '.join(left) if left else 'none'}. Each subcategory compares rows on the items every row scored."
            + safety)


MEASURE_WORDS = {"strings": "refusal-string match (no model reads the answer)", "judge": "the LLM refusal judge"}


def _percent(value) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def routing_rate_lines(metrics: dict) -> list[str]:
    """Per gated row: the share of each suite's prompts sent to the adapter, with a 95 % Wilson interval."""
    lines = []
    for name, row in metrics["rows"].items():
        routed = row.get("routed") or {}
        if name != "PRISM" or not routed:
            continue  # the other rows' routes are fixed (0 % or 100 %)
        cells = [f"{suite} {_percent(r['rate'])} ({_percent(r['ci95'][0])}–{_percent(r['ci95'][1])}, "
                 f"n = {r['n']})" for suite, r in routed.items() if r["n"]]
        lines.append(f"Routed to the adapter ({name}, 95% Wilson CI): " + "; ".join(cells) + ".")
    return lines


def agreement_lines(metrics: dict) -> list[str]:
    """Per safety set: how often refusal-string match and the LLM refusal judge agree on the same answers."""
    pooled: dict[str, list[tuple[int, float, float | None]]] = {}
    for row in metrics["rows"].values():
        for suite, a in (row.get("refusal_agreement") or {}).items():
            pooled.setdefault(suite, []).extend([(a["n"], a["agreement"], a["kappa"])] if a.get("n") else [])
    cells = []
    for suite, parts in pooled.items():
        n = sum(p[0] for p in parts)
        if not n:
            cells.append(f"{suite}: no answer with a readable judge verdict")
            continue
        agree = sum(p[0] * p[1] for p in parts) / n
        kappas = [p[2] for p in parts if p[2] is not None]
        kappa = f", Cohen's kappa {min(kappas):.2f} to {max(kappas):.2f} across rows" if kappas else ""
        cells.append(f"{suite} {100 * agree:.0f}% of {n} answers{kappa}")
    return ["String match vs refusal judge, same answers (every row pooled): " + "; ".join(cells) + "."] if cells \
        else []


def _routing_line(corr: dict) -> str:
    absolute = corr.get("absolute", {})
    return (f"Routing rate vs relative persona effect ((Expert − Base) / Base; headline, as the paper reports it): "
            f"Pearson {_fmt(corr['pearson'], 3)}, Spearman {_fmt(corr['spearman'], 3)} over {corr['n']} "
            f"subcategories. Absolute effect (Expert − Base): Pearson {_fmt(absolute.get('pearson'), 3)}, "
            f"Spearman {_fmt(absolute.get('spearman'), 3)} over {absolute.get('n')}."
            + (f" Persona effect from {corr['effect_source']}." if corr.get("effect_source") else ""))


def _preference_line(pref: dict) -> str:
    lo, hi = pref.get("ci95") or (None, None)
    # An interval that could not be computed (too few pairs) is left out, not printed as dashes.
    missing = any(v is None or (isinstance(v, float) and math.isnan(v)) for v in (lo, hi))
    interval = "no interval: too few pairs" if missing else f"95% CI {_fmt(lo)}–{_fmt(hi)}"
    return (f"Preference PRISM vs Base (n = {pref['n']}): {pref['wins']} wins, {pref['losses']} losses, "
            f"{pref['ties']} ties ({pref.get('identical', 0)} identical texts). Headline win rate, ties counted "
            f"half: {_fmt(pref['win_rate'])}% ({interval}); over decided pairs only: "
            f"{_fmt(pref['win_rate_decided'])}% (n = {pref['wins'] + pref['losses']}). Corpus judge control "
            f"accuracy {pref.get('judge_control_accuracy')} (n = {pref.get('judge_control_n')}); a win rate means "
            f"little when that is near chance.")


# The judge whose verdicts make each suite's scores (MMLU is read from letter log-probs: no judge).
SUITE_JUDGE = {"MT-Bench": "grade", "Safety": "refusal"}


def judge_cell(controls: dict, subcategory: str) -> str:
    """The control accuracy of the judge behind ``subcategory``'s scores, marked when it is at chance."""
    if subcategory.endswith(" (strings)"):
        return "no judge"
    control = controls.get(SUITE_JUDGE.get(subcategory.split("/")[0], ""))
    if not control or not control.get("control_n"):
        return "–"
    low, high = control["control_ci95"]
    return (f"{control['control_accuracy']:.0%} ({low:.0%}–{high:.0%})"
            + (" AT CHANCE" if control["at_chance"] else ""))


def _items(metrics: dict, key: str) -> str:
    """Items of a subcategory, as ``compared/items`` where some item was unscored by some row."""
    items, compared = metrics["counts"].get(key, ""), metrics.get("compared", {}).get(key)
    return str(items) if compared is None or compared == items else f"{compared}/{items}"


def _cell(value, interval) -> str:
    """A score with its 95 % interval when there is one."""
    if not interval or any(v is None or math.isnan(v) for v in interval):
        return _fmt(value)
    return f"{_fmt(value)} ({_fmt(interval[0])}–{_fmt(interval[1])})"


def _fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def plot(metrics: dict, directory: Path) -> list[Path]:
    """Bar chart of rows × subcategories and the routing scatter; returns the PNG paths."""
    import matplotlib  # lazy: only when a plot is written

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
        ax.set_xlabel("relative persona effect ((Expert − Base) / Base)")
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
             f"{', '.join(subcats)} ({len(subcats)}). Scores on 0–100 (MT-Bench ×10) with 95 % percentile "
             f"bootstrap intervals over items (Overall: items resampled within each subcategory).", "",
             "| row | " + " | ".join(subcats) + " | Overall |", "|---" * (len(subcats) + 2) + "|"]
    for name, row in metrics["rows"].items():
        intervals = row.get("intervals", {})
        lines.append(f"| {name} | " + " | ".join(_cell(row["scores"].get(s), intervals.get(s)) for s in subcats) +
                     f" | {_cell(row['overall'], row.get('overall_ci95'))} |")
    controls = metrics.get("judge_controls") or {}
    if controls:
        lines.append("| judge control accuracy | " + " | ".join(judge_cell(controls, s) for s in subcats) + " | |")
        lines += ["", "Judges on control items whose right verdict is known (a score from a judge AT CHANCE is not "
                      "a reading): " + " ".join(judge_line(n.capitalize(), c) for n, c in controls.items())]
    lines += ["", "Items per subcategory (MT-Bench: turns): " +
              ", ".join(f"{k} {v}" for k, v in metrics["counts"].items()) + ". Scored by every row, and compared: " +
              ", ".join(f"{k} {v}" for k, v in metrics.get("compared", {}).items()) + ".", "",
              _overall_line(metrics), "", *routing_rate_lines(metrics), *agreement_lines(metrics), ""]
    unread = {k: v for k, v in metrics.get("unreadable", {}).items() if v}
    lines.append("Judge verdicts that could not be read (excluded, never scored): " +
                 (", ".join(f"{k} {v}" for k, v in unread.items()) if unread else "none") + ".")
    if metrics.get("preference"):
        p = metrics["preference"]
        classes = "; ".join(f"{c}: {v['wins']} / {v['losses']} / {v['ties']}"
                            for c, v in p.get("by_class", {}).items())
        lines += ["", "Held-out corpus queries (distill and retain in proportion), judged in both orders, debiased. " +
                  _preference_line(p) + (f" Wins / losses / ties by corpus class: {classes}." if classes else "")]
    if metrics.get("routing_analysis"):
        lines += ["", _routing_line(metrics["routing_analysis"])]
    if metrics.get("settings"):
        st, cache = metrics["settings"], metrics.get("cache") or {}
        lines += ["", f"Settings: judge {st['judge']}; decoding {st['decoding']}; safety generations capped at "
                      f"{st['safety_max_new_tokens']} new tokens; MMLU n = {st['mmlu_n']}, seed {st['seed']}. "
                      f"Wall time {metrics.get('seconds')} s; prompts computed {cache.get('computed')}, reused "
                      f"{cache.get('reused')} (PRISM rows take the Base or Ungated result of the same prompt).",
                  "", _routing_settings_line(st)]
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
