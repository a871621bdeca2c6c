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

    # An explicit OMP_NUM_THREADS wins (the test suite gives each of its workers one core and runs a script there).
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or THREADS))
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


def idle_share(window_s: float = 3.0) -> float | None:
    """Share of all CPUs left idle over ``window_s`` seconds (/proc/stat): other users' load before we start."""
    def snapshot() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return values[3] + values[4], sum(values)  # idle + iowait, total
    try:
        idle0, total0 = snapshot()
        time.sleep(window_s)
        idle1, total1 = snapshot()
    except (OSError, ValueError, IndexError):
        return None
    return (idle1 - idle0) / max(1, total1 - total0)


def wait_for_quiet(max_wait_s: float = 90.0, idle_at_least: float = 0.85, log: bool = True) -> dict:
    """Wait (at most ``max_wait_s``) until other jobs leave the CPUs idle; returns what was seen.

    The machine is shared. Torch's 2 OpenMP threads stall at every barrier when another process holds one of
    the 2 cores, so a single busy neighbour can slow a decode step 10x; the interleaved ratios are the figures to
    read, and the JSON records the idle share seen before starting so a reader can discard a contended run.
    """
    start = time.perf_counter()
    idle = idle_share()
    while idle is not None and idle < idle_at_least and time.perf_counter() - start < max_wait_s:
        idle = idle_share(5.0)
    waited = round(time.perf_counter() - start, 1)
    quiet = idle is None or idle >= idle_at_least
    if log or not quiet:
        print(f"idle CPU share before start: {idle if idle is None else round(idle, 3)} (waited {waited}s)"
              f"{'' if quiet else ' -- WARNING: machine busy with other jobs, timings will be noisy'}", flush=True)
    return {"idle_share_at_start": None if idle is None else round(idle, 4), "quiet": quiet, "waited_s": waited,
            "cpu_pressure_avg10_at_start": cpu_pressure(), "load_average_at_start": os.getloadavg()[0]}


def load() -> Any:
    """The embedded SmolLM2-135M-Instruct backbone (cached per process by the library)."""
    from prism_lightning.model.backbone import BackboneConfig, load_backbone

    return load_backbone(BackboneConfig())


class ForeignCpu:
    """CPU time spent by *other* processes while a block runs: machine busy time (/proc/stat) minus our own."""

    def __enter__(self) -> "ForeignCpu":
        self.busy0, self.own0, self.wall0 = _busy_s(), _own_s(), time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        wall = time.perf_counter() - self.wall0
        busy, own = _busy_s(), _own_s()
        self.cores = None if busy is None or self.busy0 is None else max(0.0, (busy - self.busy0) - (own - self.own0)) / max(wall, 1e-9)


def _busy_s() -> float | None:
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    except (OSError, ValueError):
        return None
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def _own_s() -> float:
    t = os.times()
    return t.user + t.system


def interleaved(variants: dict[str, Callable[[], Any]], reps: int = 3, log: bool = True,
                warmups: dict[str, Callable[[], Any]] | None = None, foreign_limit: float = 0.15,
                max_rounds: int | None = None, quiet_wait_s: float = 120.0) -> dict[str, dict]:
    """Warm up every variant once, then alternate them ``reps`` times; returns times, median and last result.

    ``warmups`` may replace a variant's warm-up by a shorter run of the same code path (e.g. 2 of 16 prompts),
    which keeps a slow variant's warm-up from doubling the run time.

    Even rounds run the variants in the given order, odd ones in reverse, so drift in machine load hits both
    sides alike. The machine is shared: a round during which other processes used more than ``foreign_limit``
    cores on average (while any variant ran) is recorded as contended and repeated, up to ``max_rounds`` rounds
    in all (default ``2 * reps``); each round first waits (at most ``quiet_wait_s``) for idle CPUs. If too few
    clean rounds remain, the contended ones are used and flagged (``clean`` false).
    """
    names = list(variants)
    max_rounds = max_rounds or 2 * reps
    out: dict[str, dict] = {n: {"times_s": [], "result": None} for n in names}
    for name in names:
        start = time.perf_counter()
        out[name]["result"] = (warmups or {}).get(name, variants[name])()
        out[name]["warmup_s"] = round(time.perf_counter() - start, 4)
        if log:
            short = " (shortened)" if name in (warmups or {}) else ""
            print(f"  warm-up {name}{short}: {out[name]['warmup_s']:.2f}s", flush=True)
    rounds: list[dict] = []
    while sum(r["clean"] for r in rounds) < reps and len(rounds) < max_rounds:
        wait_for_quiet(quiet_wait_s, log=False)
        order = names if len(rounds) % 2 == 0 else names[::-1]
        entry: dict = {"order": order, "times_s": {}, "foreign_cores": {}}
        for name in order:
            with ForeignCpu() as foreign:
                start, cpu0 = time.perf_counter(), os.times()
                out[name]["result"] = variants[name]()
                elapsed, cpu1 = time.perf_counter() - start, os.times()
            entry["times_s"][name] = round(elapsed, 4)
            entry.setdefault("own_cpu_user_s", {})[name] = round(cpu1.user - cpu0.user, 3)
            entry.setdefault("own_cpu_sys_s", {})[name] = round(cpu1.system - cpu0.system, 3)
            entry["foreign_cores"][name] = None if foreign.cores is None else round(foreign.cores, 3)
            if log:
                print(f"  round {len(rounds) + 1} {name}: {elapsed:.2f}s (other processes used "
                      f"{entry['foreign_cores'][name]} cores)", flush=True)
        entry["clean"] = all(c is None or c <= foreign_limit for c in entry["foreign_cores"].values())
        if log and not entry["clean"]:
            print("  -> round contended by other jobs; it will be repeated", flush=True)
        rounds.append(entry)
    used = [r for r in rounds if r["clean"]]
    if len(used) < reps:
        used = sorted(rounds, key=lambda r: max(c or 0.0 for c in r["foreign_cores"].values()))[:reps]
    for name in names:
        out[name]["times_s"] = [r["times_s"][name] for r in used]
        out[name]["median_s"] = round(statistics.median(out[name]["times_s"]), 4)
        out[name]["clean"] = all(r["clean"] for r in used)
    timing = Timing(out)
    timing.rounds = {"all": rounds, "used": len(used), "clean": all(r["clean"] for r in used),
                     "foreign_limit_cores": foreign_limit}
    return timing


class Timing(dict):
    """Per-variant timing entries; ``rounds`` holds every round (clean or contended) for the JSON."""

    rounds: dict = {}


def rounds_note(timing: "Timing") -> str:
    """One line: how many rounds ran, how many were contended, whether the used ones are clean."""
    r = timing.rounds
    contended = sum(not x["clean"] for x in r["all"])
    return (f"{len(r['all'])} timed rounds, {contended} contended by other jobs and repeated; "
            f"{r['used']} used, {'all clean' if r['clean'] else 'NOT clean (machine stayed busy)'}")


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
    import subprocess

    import peft
    import torch
    import transformers

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=BENCH_DIR.parent, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [line[3:] for line in git("status", "--porcelain", "--", "prism_lightning").splitlines()]
    return {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "git_commit": git("rev-parse", "HEAD"), "library_uncommitted_changes": dirty,
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
    out = {name: {k: v for k, v in entry.items() if k != "result"} for name, entry in timing.items()}
    if isinstance(timing, Timing):
        out["_rounds"] = timing.rounds
    return out
