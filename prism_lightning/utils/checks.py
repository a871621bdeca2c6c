"""Config values checked up front, each error naming its full key (``data.queries.decoding.batch_size``)."""

from __future__ import annotations

from typing import Any, Optional

from prism_lightning.utils.errors import PrismError


def at_least(key: str, value: Any, minimum: float) -> None:
    """``value >= minimum``, else one line naming ``key``."""
    if value is None or value < minimum:
        raise PrismError(f"{key}: must be at least {minimum:g}, got {value!r}")


def between(key: str, value: Any, low: float, high: float, *, low_open: bool = False,
            high_open: bool = False) -> None:
    """``value`` in the interval from ``low`` to ``high`` (open ends as asked), else one line naming ``key``."""
    above = value is not None and (value > low if low_open else value >= low)
    below = value is not None and (value < high if high_open else value <= high)
    if not (above and below):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise PrismError(f"{key}: must lie in {interval}, got {value!r}")


def check_decoding(key: str, decoding: Any) -> None:
    """Every DecodingConfig field that could break generation."""
    at_least(f"{key}.batch_size", decoding.batch_size, 1)
    at_least(f"{key}.max_new_tokens", decoding.max_new_tokens, 1)
    at_least(f"{key}.temperature", decoding.temperature, 0)
    between(f"{key}.top_p", decoding.top_p, 0, 1, low_open=True)
    at_least(f"{key}.top_k", decoding.top_k, 0)
    at_least(f"{key}.repetition_penalty", decoding.repetition_penalty, 0)


def check_data(data: Any, benchmark: Optional[Any] = None) -> None:
    """The BootstrapDataModule's numbers: counts and batch sizes >= 1, fractions in range."""
    at_least("data.batch_size", data.batch_size, 1)
    at_least("data.max_length", data.max_length, 2)
    between("data.val_fraction", data.val_fraction, 0, 1, low_open=True, high_open=True)
    q, j = data.query_config, data.judge_config
    at_least("data.queries.per_persona", q.per_persona, 1)
    at_least("data.queries.oversample", q.oversample, 1)
    at_least("data.queries.max_rounds", q.max_rounds, 1)
    # Under intent, 1 would make every candidate a knowledge question: no persona-domain query left to distill.
    if j.protocol == "intent" and q.knowledge_every != 0:
        at_least("data.queries.knowledge_every", q.knowledge_every, 2)
    between("data.queries.near_duplicate", q.near_duplicate, 0, 1, low_open=True)
    check_decoding("data.queries.decoding", q.decoding)
    check_decoding("data.answers.decoding", data.answer_config.decoding)
    at_least("data.labels.samples", data.label_config.samples, 1)
    at_least("data.judge.batch_size", j.batch_size, 1)
    at_least("data.judge.max_answer_tokens", j.max_answer_tokens, 1)
    at_least("data.judge.control_pairs", j.control_pairs, 0)
    between("data.judge.min_choice_mass", j.min_choice_mass, 0, 1, high_open=True)
    if benchmark is not None:
        at_least("data.benchmark.batch_size", benchmark.batch_size, 1)
        at_least("data.benchmark.preference_n", benchmark.preference_n, 0)
        check_decoding("data.benchmark.decoding", benchmark.decoding)


def check_distillation(hp: Any, lora: Any) -> None:
    """The student's numbers: learning rate, LoRA shape, temperature, top-k, loss weights (``model.init_args.*``)."""
    key = "model.init_args"
    between(f"{key}.lr", hp.get("lr"), 0, float("inf"), low_open=True, high_open=True)
    between(f"{key}.weight_decay", hp.get("weight_decay"), 0, 1)
    between(f"{key}.warmup_ratio", hp.get("warmup_ratio"), 0, 1, high_open=True)
    at_least(f"{key}.lora.rank", lora.rank, 1)
    between(f"{key}.lora.alpha", lora.alpha, 0, float("inf"), low_open=True, high_open=True)
    between(f"{key}.lora.dropout", lora.dropout, 0, 1, high_open=True)
    # T divides the logits: 0 is a division by zero that would surface as a "non-finite loss" mid-training.
    between(f"{key}.temperature", hp.get("temperature"), 0, float("inf"), low_open=True, high_open=True)
    at_least(f"{key}.top_k", hp.get("top_k"), 0)
    at_least(f"{key}.retain_weight", hp.get("retain_weight"), 0)
    at_least(f"{key}.head_chunk", hp.get("head_chunk"), 1)
    between(f"{key}.divergence_limit", hp.get("divergence_limit"), 0, float("inf"), low_open=True)


def check_gate(hp: Any) -> None:
    """The gate's numbers (``model.init_args.*``)."""
    key = "model.init_args"
    between(f"{key}.gate_lr", hp.get("gate_lr"), 0, float("inf"), low_open=True, high_open=True)
    at_least(f"{key}.gate_weight", hp.get("gate_weight"), 0)
    between(f"{key}.threshold", hp.get("threshold"), 0, 1, low_open=True, high_open=True)
    if not hp.get("gate_dims") or any(d < 1 for d in hp.get("gate_dims")):
        raise PrismError(f"{key}.gate_dims: hidden widths must be >= 1, got {hp.get('gate_dims')!r}")
