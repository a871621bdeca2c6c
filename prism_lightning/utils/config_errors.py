"""Config mistakes as one line: the parser's multi-line messages condensed to the key and what is wrong, and the
config files themselves checked (present, valid YAML) before parsing, so the line names the file."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import yaml

from prism_lightning.utils.errors import PrismError

_KEY = re.compile(r'Parser key "([^"]+)"')
_MISSING_FILE = re.compile(r"File does not exist: '([^']+)'")


def one_line(message: str) -> str:
    """The key and the first specific reason of a jsonargparse error message, on one line."""
    text = message.strip()
    keys = _KEY.findall(text)
    key = keys[-1] if keys else None
    missing = _MISSING_FILE.search(text)
    if missing:
        return (f"{key or 'config'}: file not found: {missing.group(1)} (a relative path is read from the folder "
                f"of the config file that names it, or from the working directory on the command line)")
    unexpected = re.search(r'Key "([^"]+)" is not expected', text)
    group = re.search(r"(Group|Subcommand) '([^']+)' does not accept option '([^']+)'", text)
    if unexpected or group:
        name = unexpected.group(1) if unexpected else (
            group.group(3) if group.group(1) == "Subcommand" else f"{group.group(2)}.{group.group(3)}")
        return f"{name}: unknown key (`--print_config` lists the accepted ones)"
    problem = re.search(r"Problem with given class_path '([^']+)':\s*\n?\s*(.+)", text)
    if problem:
        return f"{key or 'class_path'}: cannot use class_path {problem.group(1)}: {problem.group(2).strip()}"
    reasons = [line.strip().lstrip("- ").strip() for line in text.splitlines()[1:] if line.strip()]
    # Union errors list one reason per accepted type: the first that is not "Expected NoneType" says the most.
    skip = ("Subtypes:", "Errors:", "Given value type:", "Expected a <class 'NoneType'>")
    reasons = [r for r in reasons if not r.startswith(skip)]
    first = text.splitlines()[0].rstrip(":")
    if key and reasons:
        return f"{key}: {reasons[0]}"
    return " ".join([first, *reasons[:1]]) if reasons and first.endswith(("failed", "Problem")) else first


def config_paths(args: Sequence[str]) -> list[str]:
    """The files given with ``--config``/``-c`` (``--config F`` or ``--config=F``)."""
    paths, items = [], list(args)
    for index, arg in enumerate(items):
        if arg in ("--config", "-c") and index + 1 < len(items):
            paths.append(items[index + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def check_config_files(args: Sequence[str]) -> None:
    """Each ``--config`` file exists and is valid YAML; else one line naming the file (and line:column)."""
    for given in config_paths(args):
        path = Path(given).expanduser()
        if not path.is_file():
            raise PrismError(f"--config {given}: file not found (from {Path.cwd()})")
        try:
            yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
            raise PrismError(f"{given}{where}: invalid YAML ({getattr(exc, 'problem', None) or exc})") from None
