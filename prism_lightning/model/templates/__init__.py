"""Packaged chat templates (Jinja) of the paper's models, selectable by name in ``BackboneConfig.chat_template``."""

from __future__ import annotations

from pathlib import Path

from prism_lightning.utils.errors import PrismError

DIRECTORY = Path(__file__).parent


def names() -> list[str]:
    """The packaged template names (file names without ``.jinja``)."""
    return sorted(p.name[:-len(".jinja")] for p in DIRECTORY.glob("*.jinja"))


def load_chat_template(name_or_path: str) -> str:
    """The Jinja text of a packaged template (``llama-3.1``) or of a template file; PrismError when neither."""
    packaged = DIRECTORY / f"{name_or_path}.jinja"
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise PrismError(f"backbone.chat_template: {name_or_path!r} is neither a packaged template "
                     f"({', '.join(names())}) nor a template file")
