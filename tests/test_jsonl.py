"""JSONL sinks that survive a kill: ordered resume, no repeats, torn-tail repair, bad lines named by line."""

from __future__ import annotations

import json
import re

import pytest

from prism_lightning.utils.errors import PrismError
from prism_lightning.utils.jsonl import JsonlSink, read_jsonl, write_json, write_jsonl


def _lines(path) -> list[str]:
    return path.read_text().splitlines()


def test_append_then_reopen_keeps_records_in_order(tmp_path):
    path = tmp_path / "stage" / "out.jsonl"  # parent directories are created
    sink = JsonlSink(path)
    assert len(sink) == 0 and sink.records() == []
    sink.append([{"id": "c", "v": 1}, {"id": "a", "v": 2}])
    sink.append([{"id": "b", "v": "ü"}])
    assert [r["id"] for r in sink.records()] == ["c", "a", "b"]

    reopened = JsonlSink(path)
    assert reopened.records() == [{"id": "c", "v": 1}, {"id": "a", "v": 2}, {"id": "b", "v": "ü"}]
    assert len(reopened) == 3
    assert "a" in reopened and "z" not in reopened
    assert reopened.get("b") == {"id": "b", "v": "ü"} and reopened.get("z") is None
    assert path.read_bytes().endswith(b"\n") and len(_lines(path)) == 3


def test_append_existing_id_writes_nothing(tmp_path):
    path = tmp_path / "out.jsonl"
    sink = JsonlSink(path)
    sink.append([{"id": "a", "v": 1}, {"id": "b", "v": 2}])
    before = path.read_bytes()
    sink.append([{"id": "a", "v": 99}])
    assert path.read_bytes() == before
    assert sink.get("a") == {"id": "a", "v": 1}
    # A reopened sink knows the finished ids too; only the new record is written.
    again = JsonlSink(path)
    again.append([{"id": "b", "v": 98}, {"id": "c", "v": 3}])
    assert [json.loads(line) for line in _lines(path)] == [{"id": "a", "v": 1}, {"id": "b", "v": 2},
                                                           {"id": "c", "v": 3}]
    again.append([])
    assert len(_lines(path)) == 3


def test_custom_key(tmp_path):
    path = tmp_path / "out.jsonl"
    sink = JsonlSink(path, key="qid")
    sink.append([{"qid": "x", "v": 1}])
    sink.append([{"qid": "x", "v": 2}, {"qid": "y", "v": 3}])
    assert [r["v"] for r in JsonlSink(path, key="qid").records()] == [1, 3]
    with pytest.raises(PrismError, match="without key 'id'"):
        JsonlSink(path)


def test_append_duplicate_ids_within_one_batch_written_once(tmp_path):
    path = tmp_path / "out.jsonl"
    sink = JsonlSink(path)
    sink.append([{"id": "a", "v": 1}, {"id": "a", "v": 2}])
    assert len(_lines(path)) == 1
    assert sink.get("a") == JsonlSink(path).get("a")


def test_torn_last_line_is_repaired_on_open(tmp_path):
    path = tmp_path / "out.jsonl"
    sink = JsonlSink(path)
    sink.append([{"id": "a", "v": 1}, {"id": "b", "v": 2}])
    intact = path.read_bytes()
    with open(path, "ab") as fh:
        fh.write(b'{"id": "c", "v": 3, "te')  # a kill mid-write: no newline, partial JSON
    reopened = JsonlSink(path)
    assert [r["id"] for r in reopened.records()] == ["a", "b"]
    assert "c" not in reopened
    assert path.read_bytes() == intact  # the torn line is cut from the file itself
    reopened.append([{"id": "c", "v": 3}])
    assert [json.loads(line) for line in _lines(path)] == [{"id": "a", "v": 1}, {"id": "b", "v": 2},
                                                           {"id": "c", "v": 3}]
    assert [r["id"] for r in JsonlSink(path).records()] == ["a", "b", "c"]


def test_torn_only_line_leaves_an_empty_file(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": "a"')
    sink = JsonlSink(path)
    assert len(sink) == 0 and path.read_bytes() == b""
    sink.append([{"id": "a"}])
    assert read_jsonl(path) == [{"id": "a"}]


def test_read_jsonl_without_repair_reports_a_torn_tail(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b", "v')
    with pytest.raises(PrismError, match=re.escape(f"{path}:2: malformed")):
        read_jsonl(path)
    assert path.read_bytes() == b'{"id": "a"}\n{"id": "b", "v'  # untouched without repair_tail


def test_malformed_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": "a"}\n\n{"id": "b"}\n{"id": "c", oops}\n{"id": "d"}\n')
    with pytest.raises(PrismError) as info:
        JsonlSink(path)
    message = str(info.value)
    assert f"{path}:4" in message
    assert f"{path}:3" not in message and f"{path}:5" not in message
    assert "\n" not in message
    with pytest.raises(PrismError, match=re.escape(f"{path}:4:")):
        read_jsonl(path)


@pytest.mark.parametrize("bad,line", [("[1, 2]", 2), ('"text"', 1), ("42", 3), ("null", 2)])
def test_read_jsonl_non_object_line(tmp_path, bad, line):
    rows = ['{"id": "a"}', '{"id": "b"}', '{"id": "c"}']
    rows[line - 1] = bad
    path = tmp_path / "out.jsonl"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(PrismError, match="JSON object") as info:
        read_jsonl(path)
    assert f"{path}:{line}:" in str(info.value)


def test_read_jsonl_missing_file_and_blank_lines(tmp_path):
    assert read_jsonl(tmp_path / "absent.jsonl") == []
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": "a"}\n\n   \n{"id": "b"}\n')
    assert read_jsonl(path) == [{"id": "a"}, {"id": "b"}]


def test_write_jsonl_and_write_json_replace_atomically(tmp_path):
    path = tmp_path / "sub" / "corpus.jsonl"
    write_jsonl(path, [{"id": "a"}, {"id": "b", "text": "ü"}])
    write_jsonl(path, [{"id": "c"}])
    assert read_jsonl(path) == [{"id": "c"}]
    doc = tmp_path / "manifest.json"
    write_json(doc, {"k": [1, 2]})
    assert json.loads(doc.read_text()) == {"k": [1, 2]}
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["corpus.jsonl", "manifest.json", "sub"]
