"""Activation checkpointing on a transformers model under either name: transformers renamed
``gradient_checkpointing_*`` to ``activation_checkpointing_*`` within the range this project allows (5.19, which
vLLM pins, has only the old name)."""

from __future__ import annotations

from typing import Any


def is_checkpointing(model: Any) -> bool:
    """Whether ``model`` recomputes its layers' activations in backward."""
    flag = getattr(model, "is_activation_checkpointing", None)
    return bool(model.is_gradient_checkpointing if flag is None else flag)


def set_checkpointing(model: Any, on: bool) -> None:
    """Turn activation checkpointing on (non-reentrant: the frozen base's inputs carry no grad) or off."""
    prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    if on:
        getattr(model, f"{prefix}_checkpointing_enable")({"use_reentrant": False})
    else:
        getattr(model, f"{prefix}_checkpointing_disable")()
