"""Shared helpers for the benchmark scripts: setup, interleaved timing, tables and JSON results.

Timing protocol (every script): each variant runs once as a warm-up (not recorded), then the variants
alternate (A B, B A, A B, ...) for ``reps`` repetitions on the same inputs, and the median is reported.
Nothing here asserts on a time: targets are reported as met / missed, never enforced.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
THREADS = 2

QUESTIONS = [
    "What is the capital of France?",
    "Explain how photosynthesis works in simple terms.",
    "Write a short poem about the ocean at night.",
    "How do I reverse a list in Python?",
    "What are three tips for getting better sleep?",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What is the difference between a virus and a bacterium?",
    "Give me a simple recipe for pancakes.",
    "How does compound interest work?",
    "What is 17 multiplied by 23, and how do you compute it?",
    "Translate 'good morning, how are you?' into Spanish.",
    "What causes the seasons on Earth?",
    "Suggest a name for a friendly golden retriever puppy.",
    "How can I prepare for a job interview?",
    "Explain what a black hole is to a ten-year-old.",
]


def setup() -> None:
    """Pin threads, point at the model cache, and silence library chatter that would clutter tables."""
    os.environ.setdefault("PRISM_CACHE_DIR", "/tmp/prismcache")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(THREADS)
    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - only cosmetics
        pass
    sys.path.insert(0, str(BENCH_DIR.parent))


def cpu_pressure() -> float | None:
    """Share of the last 10 s in which some runnable task waited for a CPU (Linux PSI), in percent."""
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return float(first.split("avg10=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return None


def wait_for_quiet(max_wait_s: float = 90.0, pressure_below: float = 25.0) -> dict:
    """Wait (at most ``max_wait_s``) until CPU pressure from other jobs drops; returns what was seen.

    The machine is shared, so absolute times drift with other users' load; the interleaved ratios are the
    figures to read. This only avoids starting in the middle of someone else's burst.
    """
    start = time.perf_counter()
    seen = cpu_pressure()
    while seen is not None and seen >= pressure_below and time.perf_counter() - start < max_wait_s:
        time.sleep(5)
        seen = cpu_pressure()
    waited = round(time.perf_counter() - start, 1)
    print(f"cpu pressure avg10 at start: {seen} % (waited {waited}s); load average {os.getloadavg()[0]:.2f}",
          flush=True)
    return {"cpu_pressure_avg10_at_start": seen, "waited_s": waited, "load_average_at_start": os.getloadavg()[0]}


def load() -> Any:
    """The embedded SmolLM2-135M-Instruct backbone (cached per process by the library)."""
    from prism_lightning.backbone import BackboneConfig, load_backbone

    return load_backbone(BackboneConfig())


def interleaved(variants: dict[str, Callable[[], Any]], reps: int = 3, log: bool = True) -> dict[str, dict]:
    """Warm up every variant once, then alternate them ``reps`` times; returns times, median and last result.

    Even repetitions run the variants in the given order, odd ones in reverse, so drift in machine load
    (another user's jobs) hits both sides alike.
    """
    names = list(variants)
    out: dict[str, dict] = {n: {"times_s": [], "result": None} for n in names}
    for name in names:
        start = time.perf_counter()
        out[name]["result"] = variants[name]()
        out[name]["warmup_s"] = round(time.perf_counter() - start, 4)
        if log:
            print(f"  warm-up {name}: {out[name]['warmup_s']:.2f}s", flush=True)
    for rep in range(reps):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            start = time.perf_counter()
            out[name]["result"] = variants[name]()
            elapsed = time.perf_counter() - start
            out[name]["times_s"].append(round(elapsed, 4))
            out[name].setdefault("cpu_pressure_avg10", []).append(cpu_pressure())
            if log:
                print(f"  rep {rep + 1}/{reps} {name}: {elapsed:.2f}s (cpu pressure avg10 {cpu_pressure()} %)",
                      flush=True)
    for name in names:
        out[name]["median_s"] = round(statistics.median(out[name]["times_s"]), 4)
    return out


def paired_ratios(times_num: list[float], times_den: list[float]) -> dict:
    """Median of the per-repetition ratios (each pair ran back to back) next to the ratio of medians."""
    per_rep = [a / b for a, b in zip(times_num, times_den)]
    return {"per_rep": [round(r, 4) for r in per_rep], "median_of_pairs": round(statistics.median(per_rep), 4),
            "ratio_of_medians": round(statistics.median(times_num) / statistics.median(times_den), 4)}


def table(rows: list[list[Any]], header: list[str]) -> str:
    """A plain fixed-width table."""
    cells = [[str(c) for c in header]] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def environment() -> dict:
    """What produced the numbers: date, machine, library versions, threads."""
    import peft
    import torch
    import transformers

    return {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "load_average_at_end": list(os.getloadavg()), "cpu_pressure_avg10_at_end": cpu_pressure()}


def write_results(script: str, payload: dict, merge: bool = False) -> Path:
    """Write ``bench/results/<script>.json`` (with ``merge``, update the keys of an existing file)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{script}.json"
    data: dict = {}
    if merge and path.is_file():
        data = json.loads(path.read_text())
    data.update(payload)
    data["environment"] = environment()
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nresults written to {path}")
    return path


def strip_results(timing: dict[str, dict]) -> dict[str, dict]:
    """Timing entries without the (possibly large) last result object."""
    return {name: {k: v for k, v in entry.items() if k != "result"} for name, entry in timing.items()}
