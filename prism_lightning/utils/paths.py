"""Input files named in a config: a relative path written in a config file is relative to that file's folder; on
the command line it is relative to the working directory.

jsonargparse's path types remember the folder each value was read in; ``absolute_paths`` makes each one absolute
before anything is instantiated, so the code (``str()``/``Path()`` of it), the saved config and every message see
one absolute path.
"""

from __future__ import annotations

import os
from typing import Any

from jsonargparse import Namespace
from jsonargparse.typing import Path, Path_fr, path_type

# A file that must exist (checked when the config is parsed, the error naming the key).
InputFile = Path_fr
# A file or a directory of files that must exist.
InputPath = path_type("r", docstring="an existing file or directory")


def absolute_paths(value: Any, found: list[str] | None = None) -> list[str]:
    """Make every parsed path in a jsonargparse Namespace (or dict/list) absolute, in place; return them as
    strings (the ``--config`` files themselves are kept as jsonargparse holds them, and not listed)."""
    found = [] if found is None else found
    items = (vars(value).items() if isinstance(value, Namespace) else value.items() if isinstance(value, dict)
             else enumerate(value) if isinstance(value, list) else ())
    for key, item in list(items):
        if key == "config" and isinstance(value, Namespace):
            continue
        if isinstance(item, Path):  # the base of every jsonargparse path type
            resolved = os.fspath(item)
            found.append(resolved)
            # The same type, now absolute: the saved config holds absolute paths and still validates.
            absolute = type(item)(resolved)
            if isinstance(value, Namespace):
                setattr(value, key, absolute)
            else:
                value[key] = absolute
        else:
            absolute_paths(item, found)
    return found

