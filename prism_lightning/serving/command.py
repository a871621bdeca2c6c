"""The ``prism serve`` command line: its own small parser (no Trainer, model or data), errors in one line."""

from __future__ import annotations

from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser

from prism_lightning.serving.server import ServeConfig, serve
from prism_lightning.utils.config_errors import one_line
from prism_lightning.utils.errors import PrismError


def serve_command(args: list[str]) -> None:
    """Parse ``prism serve`` arguments (``--config`` YAML too) and serve; a bad argument is one ``PrismError``."""
    parser = ArgumentParser(prog="prism serve", exit_on_error=False,
                            description="Serve an export over OpenAI's HTTP API (chat and text completions, "
                                        "streaming, forced routes).")
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these settings")
    parser.add_class_arguments(ServeConfig, as_group=False)
    try:
        settings = parser.parse_args(args).as_dict()
    except ArgumentError as exc:
        raise PrismError(one_line(str(exc))) from None
    settings.pop("config", None)
    serve(ServeConfig(**settings))
