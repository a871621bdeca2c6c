"""Which adapter distils which contexts: K adapters, one gate with K + 1 outcomes (none, or which adapter).

``data.adapters`` maps an adapter name to the contexts it distils; empty (the default) means one adapter,
``default``, for every context — binary PRISM, the K = 1 case of the same code.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

from prism_lightning.utils.errors import PrismError

RESERVED = ("__base__", "gate", "adapter", "base")  # PEFT's "no adapter" and GatedModel's route names
DEFAULT_ADAPTER = "default"  # PEFT's own name for a first adapter: a K = 1 export keeps PEFT's plain layout


def adapter_names(groups: Optional[Mapping[str, Sequence[str]]]) -> list[str]:
    """The adapters a run trains, in order (one ``default`` adapter when no groups are given)."""
    return list(groups or {}) or [DEFAULT_ADAPTER]


def adapter_of(groups: Mapping[str, Sequence[str]], contexts: Sequence[str]) -> dict[str, int]:
    """Context name -> index of the adapter that distils it; every context in exactly one adapter."""
    if not groups:
        return {name: 0 for name in contexts}
    index: dict[str, int] = {}
    for k, (adapter, members) in enumerate(groups.items()):
        if adapter in RESERVED or not adapter:
            raise PrismError(f"data.adapters: {adapter!r} cannot name an adapter (reserved: {', '.join(RESERVED)})")
        if not members:
            raise PrismError(f"data.adapters.{adapter}: lists no contexts")
        for name in members:
            if name not in contexts:
                raise PrismError(f"data.adapters.{adapter}: unknown context {name!r}; this run has "
                                 f"{', '.join(contexts)}")
            if name in index:
                raise PrismError(f"data.adapters.{adapter}: context {name!r} is already distilled by adapter "
                                 f"{list(groups)[index[name]]!r}")
            index[name] = k
    missing = [name for name in contexts if name not in index]
    if missing:
        raise PrismError(f"data.adapters: context {missing[0]!r} is in no adapter; add it to one")
    return index


def check_adapters(trained: Sequence[str], asked: Sequence[str], where: str) -> None:
    """One line when a checkpoint or export trained other adapters than this run routes to."""
    if list(trained) != list(asked):
        raise PrismError(f"{where} was trained with {len(trained)} adapter(s) ({', '.join(trained)}) but this run "
                         f"asks for {len(asked)} ({', '.join(asked)}): K-way routing needs a gate and adapters "
                         f"trained with the same contexts; set data.adapters as in that run")
