"""Write study.json, the PNG figures and report.md; print the effect table."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from prism_lightning.evaluation.judge_controls import judge_line
from prism_lightning.evaluation.report import _cell, _fmt, _strict_json


def _signed(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:+.1f}"


def effect_conditions(study: dict) -> list[str]:
    """Every condition but no persona, in study order."""
    return [c for c in study["conditions"] if c != "none"]


def print_effects(study: dict, console: Console | None = None) -> None:
    """Relative persona effect (%) by subcategory x condition, with the no-persona score for scale."""
    console = console or Console(width=None if Console().is_terminal else 200)
    names = effect_conditions(study)
    table = Table(title="Persona effect: (condition − no persona) / no persona, % (– = not applicable)")
    table.add_column("subcategory", no_wrap=True)
    table.add_column("no persona", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    none_scores = _scores(study, "none")
    for sub in study["subcategories"]:
        table.add_row(sub, _fmt(none_scores.get(sub)),
                      *[_signed(study["effects"][sub].get(n, {}).get("relative")) for n in names])
    console.print(table)
    for line in summary_lines(study):
        console.print(line)
    for name, control in (study.get("judge_controls") or {}).items():
        console.print(judge_line(name.capitalize(), control))


def _scores(study: dict, condition: str) -> dict:
    out = {}
    for cell in study["cells"]:
        if cell["condition"]["name"] == condition:
            out.update(cell["scores"])
    return out


def summary_lines(study: dict) -> list[str]:
    """Per group: the mean effect of the longest matched persona, and the control where it ran."""
    lines = []
    main, longest = study.get("main_placement"), study.get("longest_granularity")
    name = f"matched/{longest}/{main}"
    for group, values in study["groups"].items():
        if name in values:
            member = study.get("group_members", {}).get(group, {}).get(name, {})
            averaged = ", ".join(s.split("/", 1)[1] for s in member.get("averaged", [])) or "none"
            skipped = "; ".join(f"{s.split('/', 1)[1]} ({why})" for s, why in member.get("skipped", {}).items())
            lines.append(f"{group}: mean relative effect of the matched {longest} persona ({main} placement) "
                         f"{_signed(values[name])} %, over {averaged}" + (f"; skipped: {skipped}." if skipped else "."))
    gains = [v["value"] for v in study.get("control", {}).values()
             if v.get("value") is not None and not math.isnan(v["value"])]
    if gains:
        lines.append(f"Other-persona control: matched lift − mean non-matched lift, mean over {len(gains)} "
                     f"subcategories {_signed(sum(gains) / len(gains))} points of relative effect "
                     f"(> 0: the persona's domain matters; ≈ 0: any persona does as well).")
    return lines


def plot(study: dict, directory: Path) -> list[Path]:
    """heatmap.png, length.png, placement.png and control.png (those the study has data for)."""
    import matplotlib  # lazy: only when a plot is written

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths: list[Path] = []
    subs, names = study["subcategories"], effect_conditions(study)

    def save(fig, name: str) -> None:
        fig.tight_layout()
        paths.append(directory / name)
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)

    grid = np.array([[_nan(study["effects"][s].get(n, {}).get("relative")) for n in names] for s in subs])
    if grid.size:
        fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(names) + 3), max(3, 0.35 * len(subs) + 1.5)))
        bound = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
        image = ax.imshow(grid, cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(subs)), subs, fontsize=7)
        for (i, j), value in np.ndenumerate(grid):
            if np.isfinite(value):
                ax.text(j, i, f"{value:+.0f}", ha="center", va="center", fontsize=6)
        fig.colorbar(image, label="relative effect vs no persona (%)")
        ax.set_title("Persona effect by category x condition")
        save(fig, "heatmap.png")
    groups = [g for g in study["groups"]]
    length = study["length"]
    order = [g for g in ("min", "half", "full") if any(g in length[s] for s in subs)]
    if len(order) > 1:
        fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.5), squeeze=False)
        for ax, group in zip(axes[0], groups):
            members = [s for s in subs if s.startswith(group + "/")]
            for s in members:
                ax.plot(order, [_nan(length[s].get(g)) for g in order], marker="o", alpha=0.4, label=s.split("/")[1])
            mean = [np.nanmean([_nan(length[s].get(g)) for s in members] or [np.nan]) for g in order]
            ax.plot(order, mean, color="black", linewidth=2.5, marker="s", label="mean")
            ax.axhline(0, color="grey", linewidth=0.8)
            ax.set_title(group)
            ax.set_xlabel("persona length")
            ax.legend(fontsize=5)
        axes[0][0].set_ylabel(f"relative effect (%), {study.get('main_placement')} placement")
        save(fig, "length.png")
    placement = study["placement"]
    places = [p for p in ("system", "user") if any(p in placement[s] for s in subs)]
    if len(places) > 1:
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(subs) + 2), 4))
        width = 0.8 / len(places)
        for i, p in enumerate(places):
            ax.bar([j + i * width for j in range(len(subs))], [_nan(placement[s].get(p)) for s in subs], width,
                   label=p)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(subs))], subs, rotation=45, ha="right", fontsize=7)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_ylabel(f"relative effect (%), {study.get('longest_granularity')} persona")
        ax.legend(title="placement", fontsize=7)
        save(fig, "placement.png")
    control = study.get("control") or {}
    if any(math.isfinite(_nan(v.get("value"))) for v in control.values()):
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(subs) + 2), 4))
        values = [_nan(control[s].get("value")) for s in subs]
        spans = [control[s].get("ci95") or [None, None] for s in subs]
        low = [v - _nan(span[0]) for span, v in zip(spans, values)]
        high = [_nan(span[1]) - v for span, v in zip(spans, values)]
        ax.bar(range(len(subs)), values, yerr=[np.nan_to_num(low), np.nan_to_num(high)], capsize=2)
        ax.set_xticks(range(len(subs)), subs, rotation=45, ha="right", fontsize=7)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_ylabel("matched − mean other-persona lift (points of %)")
        ax.set_title("Other-persona control (95% paired bootstrap)")
        save(fig, "control.png")
    return paths


def _nan(value) -> float:
    return float("nan") if value is None else float(value)


def write_study(study: dict, directory: Path) -> Path:
    """study.json, figures and report.md under ``directory``; returns the report path."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "study.json").write_text(json.dumps(_strict_json(study), indent=1, allow_nan=False))
    pngs = plot(study, directory)
    subs, names = study["subcategories"], effect_conditions(study)
    st = study.get("settings", {})
    lines = ["# Persona study", "",
             f"Model `{study.get('model')}` ({st.get('dtype')}), judge {st.get('judge')}, decoding "
             f"{st.get('decoding')}. Every condition scores the same items; effects compare each condition with "
             f"no persona on the items both scored (paired bootstrap 95 % intervals).", ""]
    fallback = [c for c in study.get("condition_details", []) if c.get("requested")]
    if fallback:
        lines += [f"The chat template has no system role: {len(fallback)} condition(s) asked for "
                  f"{fallback[0]['requested']} placement and used {fallback[0]['placement']} (recorded per "
                  f"condition in study.json).", ""]
    lines += ["## Scores (0–100, MT-Bench ×10; 95 % bootstrap interval; n scored)", "",
              "| subcategory | " + " | ".join(["none", *names]) + " |", "|---" * (len(names) + 2) + "|"]
    by_condition = {c["condition"]["name"]: {} for c in study["cells"]}
    for cell in study["cells"]:
        by_condition[cell["condition"]["name"]].update(
            {k: (cell["scores"].get(k), cell["intervals"].get(k), cell["counts"].get(k)) for k in cell["scores"]})
    for sub in subs:
        row = [by_condition.get(n, {}).get(sub, (None, None, None)) for n in ["none", *names]]
        lines.append(f"| {sub} | " + " | ".join(f"{_cell(s, i)} n={c}" for s, i, c in row) + " |")
    lines += ["", "## Persona effect, relative to no persona (%)", "",
              "| subcategory | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for sub in subs:
        lines.append(f"| {sub} | " + " | ".join(_effect_cell(study["effects"][sub].get(n)) for n in names) + " |")
    if study.get("control"):
        lines += ["", "## Other-persona control", "", study["control_definition"] + ".", "",
                  "| subcategory | matched persona | gain | 95 % interval | non-matched personas | n |",
                  "|---|---|---|---|---|---|"]
        for sub in subs:
            v = study["control"][sub]
            span = (f"{_signed(v['ci95'][0])} to {_signed(v['ci95'][1])}" if v.get("ci95")
                    else f"none: {v.get('no_interval', 'not computed')}")
            lines.append(f"| {sub} | {v.get('matched', '–')} | {_signed(v.get('value'))} | {span} | "
                         f"{v.get('others', 0)} | {v.get('n')} |")
    controls = study.get("judge_controls") or {}
    lines += ["", "## Judges on items with known verdicts", "",
              *([f"- {judge_line(name.capitalize(), c)}" for name, c in controls.items()] if controls else
                ["No judge controls were run (`study.suites.judge_controls` is 0, or no judged suite): the "
                 "MT-Bench grades and refusal rates above carry no measured judge accuracy."])]
    unread = {c["key"]: sum(c["unreadable"].values()) for c in study["cells"] if sum(c["unreadable"].values())}
    lines += ["", "Judge verdicts that could not be read (excluded, never scored): " +
              (", ".join(f"{k} {v}" for k, v in unread.items()) if unread else "none") + ".", "",
              *summary_lines(study), "", f"Wall time of the computed cells: {study.get('seconds')} s.", "",
              *[f"![{p.stem}]({p.name})" for p in pngs], ""]
    (directory / "report.md").write_text("\n".join(lines))
    return directory / "report.md"


def _effect_cell(effect) -> str:
    if not effect:
        return "–"
    if effect.get("relative_ci95"):
        low, high = effect["relative_ci95"]
        return f"{_signed(effect['relative'])} ({_signed(low)}, {_signed(high)})"
    # No relative interval: say why, and show the absolute change (defined in every resample) with its own.
    absolute = effect.get("absolute_ci95")
    shown = (f"absolute {_signed(effect['absolute'])} ({_signed(absolute[0])}, {_signed(absolute[1])}) points"
             if absolute else f"absolute {_signed(effect['absolute'])} points")
    return f"{_signed(effect['relative'])} (no interval: {effect.get('relative_no_interval', 'n/a')}; {shown})"
