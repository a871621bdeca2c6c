"""Silence third-party notices a user cannot act on, and only those; real warnings stay visible."""

from __future__ import annotations

import logging
import warnings

# Message regexes of library notices that advertise or explain the library's own packaging.
_IGNORED_WARNINGS = (
    r"Starting from v1\.9\.0, `tensorboardX` has been removed",  # Lightning: CSVLogger is what we want
    r"`is_gradient_checkpointing` is deprecated",  # PEFT calling a transformers 5 alias
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning 2.6 against torch 2.13's pytree
)
_IGNORED_LOG_PREFIXES = ("💡 Tip:",)  # Lightning's adverts for its cloud products


class _DropPrefixes(logging.Filter):
    """Drops log records whose message starts with one of the given prefixes."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep every record except the listed notices."""
        return not str(record.getMessage()).startswith(self.prefixes)


def quiet_third_party_notices() -> None:
    """Install the filters (idempotent)."""
    for message in _IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    drop = _DropPrefixes(_IGNORED_LOG_PREFIXES)
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefixes) for f in logger.filters):
            logger.addFilter(drop)
        for handler in logger.handlers:
            if not any(isinstance(f, _DropPrefixes) for f in handler.filters):
                handler.addFilter(drop)
