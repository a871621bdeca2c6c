"""JSONL files that survive SIGKILL: whole-line appends, torn tails repaired, bad lines named by file and line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional

from prism_lightning.utils.errors import PrismError


def read_jsonl(path: Path, repair_tail: bool = False) -> list[dict]:
    """Read every record; a malformed line raises ``PrismError`` naming ``file:line``.

    A last line without its newline is a write that a kill cut short: with ``repair_tail`` it is
    removed from the file (the item is simply not done yet), otherwise it is an error like any other.
    """
    return [record for _, record in read_jsonl_numbered(path, repair_tail)]


def read_jsonl_numbered(path: Path, repair_tail: bool = False) -> list[tuple[int, dict]]:
    """Like ``read_jsonl``, with each record's physical line number (blank lines counted) for error messages."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    if tail and repair_tail:
        with open(path, "r+b") as fh:
            fh.truncate(len(raw) - len(tail))
    elif tail:
        lines.append(tail)
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PrismError(f"{path}:{number}: not UTF-8 text (byte {line[exc.start]:#04x} at column "
                             f"{exc.start + 1})") from None
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PrismError(f"{path}:{number}: malformed JSONL line ({exc.msg})") from None
        if not isinstance(record, dict):
            raise PrismError(f"{path}:{number}: malformed JSONL line (expected a JSON object)")
        records.append((number, record))
    return records


def read_text(path: Path, what: str) -> str:
    """A UTF-8 text file; undecodable bytes are one line naming the file, line and column."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise PrismError(f"{path}:{line}: {what} is not UTF-8 text (byte {raw[exc.start]:#04x} at column "
                         f"{column})") from None


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    """Replace ``path`` atomically (temp file + rename); an identical file is left untouched."""
    _replace(Path(path), "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def write_json(path: Path, obj: Any) -> None:
    """Write a JSON document atomically; an identical file is left untouched."""
    _replace(Path(path), json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _replace(path: Path, text: str) -> None:
    data = text.encode("utf-8")
    if path.is_file() and path.read_bytes() == data:
        return  # commands that only re-read a run must not rewrite its files
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def append_jsonl(path: Path, records: Iterable[dict]) -> None:
    """Append records with one write and an fsync, so a kill tears at most the last line."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


class JsonlSink:
    """An append-only result file keyed by ``key``: resumes after a kill without losing or repeating items."""

    def __init__(self, path: Path, key: str = "id") -> None:
        self.path = Path(path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._records: dict[str, dict] = {}
        for record in read_jsonl(self.path, repair_tail=True):
            if key not in record:
                raise PrismError(f"{self.path}: record without key {key!r}")
            self._records.setdefault(record[key], record)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, item_id: str) -> Optional[dict]:
        """The finished record for ``item_id``, or None."""
        return self._records.get(item_id)

    def records(self) -> list[dict]:
        """All finished records in the order they were first written."""
        return list(self._records.values())

    def append(self, records: list[dict]) -> None:
        """Append records not yet present with one write and an fsync, so a kill tears at most the tail."""
        fresh: list[dict] = []
        batch_ids: set = set()
        for r in records:
            if r[self.key] not in self._records and r[self.key] not in batch_ids:
                batch_ids.add(r[self.key])
                fresh.append(r)
        if not fresh:
            return
        append_jsonl(self.path, fresh)
        for r in fresh:
            self._records[r[self.key]] = r
