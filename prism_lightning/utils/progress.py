"""Progress reporting: a rich bar on a terminal, plain log lines otherwise (Slurm logs, CI)."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextmanager
def progress(total: int, description: str) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; draws a rich bar when stderr is a terminal, else logs about every 10 %."""
    console = Console(stderr=True)
    if console.is_terminal:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n: bar.advance(task, n)
        return
    state = {"done": 0, "next": 0.0, "start": time.perf_counter()}

    def advance(n: int) -> None:
        state["done"] += n
        if state["done"] >= state["next"] or state["done"] >= total:
            elapsed = time.perf_counter() - state["start"]
            print(f"[prism] {description}: {state['done']}/{total} ({elapsed:.0f}s)", file=sys.stderr, flush=True)
            state["next"] = state["done"] + max(1, total // 10)

    yield advance


def announce(stage: str, detail: str = "") -> None:
    """One line naming the stage a command enters; plain text when the output is not a terminal."""
    Console(stderr=True, highlight=False).print(f"[bold]== prism: {stage}[/bold]" + (f" — {detail}" if detail else ""))
