"""Rich tables for the terminal: the corpus summary."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from prism_lightning.bootstrap.corpus import Corpus


def judge_verdict(judge: dict) -> str:
    """Plain words on whether the judge's labels can be told from noise, from its control accuracy interval."""
    acc, n, (low, high) = judge.get("control_accuracy"), judge.get("control_n", 0), judge.get("control_ci95", [0, 1])
    if not n:
        return "No control pairs were judged (data.judge.control_pairs = 0): the labels' reliability is unknown."
    text = f"Judge control accuracy {acc:.0%} (n = {n}, 95% CI {low:.0%}–{high:.0%})."
    if low <= 0.5:
        return (text + " The interval includes chance: these labels cannot be told from noise. Set "
                "data.judge.model to a stronger judge (e.g. name_or_path: Qwen/Qwen2.5-7B-Instruct) or raise "
                "data.judge.control_pairs to measure it more precisely.")
    return text + " The judge prefers a query's own answer more often than chance."


def print_corpus_summary(corpus: Corpus, console: Console | None = None) -> None:
    """Per-persona counts, class balance and judge reliability of a corpus."""
    console = console or Console()
    m = corpus.manifest
    table = Table(title=f"PRISM corpus — {corpus.directory}")
    for col in ("persona", "queries", "distill", "retain", "distill rate"):
        table.add_column(col, justify="left" if col == "persona" else "right")
    for name, row in m["per_persona"].items():
        q, d = row["queries"], row["distill"]
        table.add_row(name, str(q), str(d), str(q - d), f"{d / q:.0%}" if q else "–")
    c = m["counts"]
    total = c["distill"] + c["retain"]
    table.add_row("[bold]all", str(c["queries"]), str(c["distill"]), str(c["retain"]),
                  f"{c['distill'] / total:.0%}" if total else "–", end_section=True)
    console.print(table)
    print_judge_lines(corpus, console)
    ranks = f"  ranks: {m['world_size']}" if any(w > 1 for w in m.get("world_size", {}).values()) else ""
    console.print(f"stage seconds: {m['seconds']}{ranks}  manifest: {corpus.directory / 'manifest.json'}")


def print_judge_lines(corpus: Corpus, console: Console) -> None:
    """The judge's statistics and the plain-words reliability verdict."""
    j = corpus.manifest.get("judge")
    if not j:
        console.print("judge: the manifest records no judge statistics (a corpus not built by `prism bootstrap`): "
                      "the labels' reliability is unknown.")
        return
    bias = "n/a" if j.get("position_bias_rate") is None else f"{j['position_bias_rate']:.0%}"
    console.print(f"judge: protocol={j['protocol']} margin={j['margin']} position-bias rate={bias} "
                  f"tie rate={j['tie_rate']:.0%} unparseable={j['unparseable']}")
    console.print(judge_verdict(j))


def print_corpus_lines(corpus: Corpus, console: Console) -> None:
    """The corpus in two lines plus the judge's reliability: what a fit's closing summary shows."""
    c = corpus.manifest["counts"]
    console.print(f"corpus: {c['queries']} queries -> {c['distill']} distill / {c['retain']} retain "
                  f"({corpus.directory})")
    print_judge_lines(corpus, console)
