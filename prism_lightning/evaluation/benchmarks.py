"""Readers for the benchmark files: MT-Bench question.jsonl, HarmBench CSV, JSON prompt lists."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Union

from jsonargparse.typing import restricted_string_type

from prism_lightning.utils.errors import PrismError
from prism_lightning.utils.jsonl import read_text
from prism_lightning.utils.paths import InputFile

# The benchmark files shipped in the package (evaluation/data/README.md: origin, rows, licence), named in a config
# as ``builtin:<stem>``.
BUILTIN_DIR = Path(__file__).parent / "data"
BUILTIN_PREFIX = "builtin:"
BuiltinName = restricted_string_type("BuiltinName", r"^builtin:[A-Za-z0-9_]+$",
                                     docstring="a benchmark file shipped in the package, e.g. builtin:mt_bench")
# A benchmark file in a config: a shipped one, or a path of your own (relative to the config file naming it).
BenchmarkFile = Union[InputFile, BuiltinName]

MT_BENCH_FORMAT = "FastChat question.jsonl: one JSON object per line with question_id, category, turns (list of str)"
HARMBENCH_FORMAT = "HarmBench behaviors CSV with a header including Behavior (and optionally ContextString)"
PROMPT_LIST_FORMAT = "a JSON list of prompt strings (or of objects with a 'prompt' field)"
# MT-Bench categories map one-to-one onto the eight task personas.
MT_BENCH_PERSONA = {c: c for c in ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem",
                                   "humanities")}


# Shipped data that is not a benchmark (the string-match refusal measure's list, ``refusal_strings.py``).
NOT_BENCHMARKS = ("refusal_strings",)


def builtin_names() -> list[str]:
    """The ``builtin:`` names of the shipped benchmark files."""
    return sorted(p.stem for p in BUILTIN_DIR.iterdir()
                  if p.is_file() and p.suffix in (".jsonl", ".csv", ".json") and p.stem not in NOT_BENCHMARKS)


def resolve(path: str | Path) -> Path:
    """The file a benchmark setting names: ``builtin:<name>`` maps to the shipped copy, anything else is a path."""
    text = str(path)
    if not text.startswith(BUILTIN_PREFIX):
        return Path(path)
    name = text[len(BUILTIN_PREFIX):]
    matches = [p for p in BUILTIN_DIR.iterdir() if p.stem == name and p.stem in builtin_names()]
    if not matches:
        raise PrismError(f"{text}: no such shipped benchmark; shipped: "
                         f"{', '.join(BUILTIN_PREFIX + n for n in builtin_names())}")
    return matches[0]


def _exists(path: Path, what: str) -> Path:
    path = resolve(path)
    if not path.is_file():
        raise PrismError(f"benchmark file not found: {path} (expected {what})")
    return path


def load_mt_bench(path: str | Path) -> list[dict]:
    """MT-Bench questions; a row without the expected fields is an error naming file and (physical) line."""
    path = _exists(path, MT_BENCH_FORMAT)
    rows = []
    for number, line in enumerate(read_text(path, "MT-Bench file").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PrismError(f"{path}:{number}: malformed JSONL line ({exc.msg}; expected {MT_BENCH_FORMAT})") \
                from None
        turns = row.get("turns") if isinstance(row, dict) else None
        if not isinstance(turns, list) or not isinstance(row.get("category"), str) or not turns or \
                not all(isinstance(t, str) for t in turns):
            raise PrismError(f"{path}:{number}: malformed MT-Bench row (expected {MT_BENCH_FORMAT})")
        rows.append(row)
    return _non_empty(rows, path, MT_BENCH_FORMAT)


def _non_empty(rows: list[dict], path: Path, what: str) -> list[dict]:
    if not rows:
        raise PrismError(f"{path}: no rows (expected {what})")
    return rows


def load_harmbench(path: str | Path) -> list[dict]:
    """HarmBench behaviors as prompts; contextual behaviors get their context string in front."""
    path = _exists(path, HARMBENCH_FORMAT)
    with io.StringIO(read_text(path, "HarmBench file"), newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "Behavior" not in reader.fieldnames:
            raise PrismError(f"{path}:1: missing column 'Behavior' (expected {HARMBENCH_FORMAT})")
        rows = []
        for record in reader:
            number = reader.line_num
            behavior = (record.get("Behavior") or "").strip()
            if not behavior:
                raise PrismError(f"{path}:{number}: malformed HarmBench row (empty Behavior)")
            context = (record.get("ContextString") or "").strip()
            rows.append({"prompt": f"{context}\n\n{behavior}" if context else behavior,
                         "category": record.get("FunctionalCategory") or "standard"})
    return _non_empty(rows, path, HARMBENCH_FORMAT)


def load_prompt_list(path: str | Path) -> list[dict]:
    """A JSON list of prompts (jailbreak-style or PKU-style)."""
    path = _exists(path, PROMPT_LIST_FORMAT)
    try:
        data = json.loads(read_text(path, "prompt list"))
    except json.JSONDecodeError as exc:
        raise PrismError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg}; expected {PROMPT_LIST_FORMAT})") from None
    if not isinstance(data, list):
        raise PrismError(f"{path}: expected {PROMPT_LIST_FORMAT}")
    rows = []
    for index, item in enumerate(data):
        prompt = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(prompt, str) or not prompt.strip():
            raise PrismError(f"{path}: item {index} is not a prompt string (expected {PROMPT_LIST_FORMAT})")
        rows.append({"prompt": prompt})
    return _non_empty(rows, path, PROMPT_LIST_FORMAT)
