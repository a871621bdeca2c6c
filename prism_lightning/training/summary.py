"""What the terminal shows of a run: the corpus summary, the judge's reliability, distillation from initialisation."""

from __future__ import annotations

import math
from typing import Optional

from rich.console import Console
from rich.table import Table

from prism_lightning.bootstrap.compare import print_comparison
from prism_lightning.bootstrap.corpus import Corpus
from prism_lightning.bootstrap.labels import controls_verdict
from prism_lightning.bootstrap.reliability import reliability_text
from prism_lightning.bootstrap.source_bias import bias_note
from prism_lightning.utils.stats import wilson_interval


def _control_text(judge: dict, prefix: str, what: str) -> str:
    acc, n, (low, high) = judge.get(f"{prefix}_accuracy"), judge.get(f"{prefix}_n", 0), judge.get(f"{prefix}_ci95",
                                                                                                  [0, 1])
    return f"{what} {acc:.0%} (n = {n}, 95% CI {low:.0%}–{high:.0%})" if n else f"{what}: not measured"


def judge_verdict(judge: dict) -> str:
    """Plain words on whether the judge's labels can be told from noise, from both control kinds' intervals.

    Relevance: a query's own answer vs another query's. Quality: the own answer vs a degraded copy of it. A judge
    must pass both: likelihood scores, for one, see relevance easily and quality less so.
    """
    if judge.get("protocol") == "intent" and judge.get("intent_scorer") == "none":
        return ("No judge ran (data.judge.protocol = intent, data.judge.intent_scorer = none): every label is by "
                "construction.")
    if not judge.get("control_n") and not judge.get("quality_n"):
        return "No control pairs were judged (data.judge.control_pairs = 0): the labels' reliability is unknown."
    text = (f"Judge control accuracy: {_control_text(judge, 'control', 'relevance')}; "
            f"{_control_text(judge, 'quality', 'quality')}.")
    if judge.get("cross_persona_n"):
        text += (f" Cross-source: {bias_note(judge)}; it prefers the baseline answer on "
                 f"{judge['prefers_baseline']:.0%} of the corpus pairs.")
    if judge.get("source_bias"):
        return text + (f" The judge leans toward the {judge['source_bias']} answers whatever their quality: its "
                       "labels measure the source more than the answer. Compare protocols (data.judge.compare=true) "
                       "or set data.judge.model to a stronger judge.")
    if controls_verdict(judge) == "reliable":
        return text + " Both intervals lie above chance: the judge tells better answers from worse ones."
    weak = [what for prefix, what in (("control", "relevance"), ("quality", "quality"))
            if not judge.get(f"{prefix}_n") or judge[f"{prefix}_ci95"][0] <= 0.5]
    return (text + f" The {' and '.join(weak)} interval{'s' if len(weak) > 1 else ''} include"
            f"{'' if len(weak) > 1 else 's'} chance: these labels cannot be told from noise. Compare protocols "
            "(data.judge.compare=true), set data.judge.model to a stronger judge (e.g. name_or_path: "
            "Qwen/Qwen2.5-7B-Instruct), or raise data.judge.control_pairs to measure it more precisely.")


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
    if m.get("judge_compare"):
        print_comparison(m["judge_compare"], console)
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
    console.print(reliability_text(corpus.manifest.get("labels")))


def print_corpus_lines(corpus: Corpus, console: Console) -> None:
    """The corpus in two lines plus the judge's reliability: what a fit's closing summary shows."""
    c = corpus.manifest["counts"]
    console.print(f"corpus: {c['queries']} queries -> {c['distill']} distill / {c['retain']} retain "
                  f"({corpus.directory})")
    print_judge_lines(corpus, console)
    if corpus.manifest.get("judge_compare"):
        print_comparison(corpus.manifest["judge_compare"], console)


def kl_change(kl_init: Optional[float], kl_now: float) -> str:
    """``kl_now`` against the held-out KL at initialisation: "0.0620 (−24.4 % from 0.0820 at initialisation)"."""
    if kl_init is None or not math.isfinite(kl_init) or kl_init <= 0:
        return f"{kl_now:.4f}"
    return f"{kl_now:.4f} ({(kl_now - kl_init) / kl_init:+.1%} from {kl_init:.4f} at initialisation)"


def distillation_line(kl_init: Optional[float], kl_final: Optional[float], epochs: int) -> str:
    """The fit's closing line on distillation: held-out KL before the first step and after the last epoch."""
    if kl_final is None:
        return "Distillation: no held-out KL was measured (no validation split)."
    return (f"Distillation: held-out KL(teacher ‖ student) after {epochs} epoch{'s' if epochs != 1 else ''} "
            f"{kl_change(kl_init, kl_final)}.")


def adapter_choice_line(held: dict, adapters: list[str]) -> str:
    """K-way runs: how often the gate picks the adapter of a held-out distill item's context (chance 1 / K)."""
    if len(adapters) < 2:
        return ""
    distill = held["routes"] > 0
    n = int(distill.sum())
    if not n:
        return "Adapter choice: no held-out distill items to check it on."
    k = int((held["choice"][distill] == held["routes"][distill]).sum())
    low, high = wilson_interval(k, n)
    return (f"Adapter choice ({len(adapters)} adapters: {', '.join(adapters)}): the gate picks the item's own adapter "
            f"on {k} of {n} held-out distill items ({100 * k / n:.0f} %, 95 % CI {100 * low:.0f}–{100 * high:.0f} %; "
            f"chance {100 / len(adapters):.0f} %).")
