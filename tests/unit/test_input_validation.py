"""Typed input: every importer checks each record's field types and reports file:line and field; a
failed import writes nothing to the store; an input without notes, or without events and given pairs,
is an error naming the input."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

import notellm_jax  # noqa: F401
from notellm_jax.config import Config, override
from notellm_jax.data import importers, store
from notellm_jax.errors import InputFormatError

NOTE = {"note_id": "a", "title": "A", "content": "x", "topics": ["t"], "category": "c", "created_at": 1}
EVENT = {"user_id": "u", "note_id": "a", "timestamp": 3, "action": "click"}


def _jsonl(path: Path, records: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _config(source: str, folder: Path, work: Path) -> Config:
    return override(Config(), {"data.source": source, "data.input_path": str(folder),
                               "paths.work_dir": str(work)})


def _import(source: str, folder: Path, tmp_path: Path) -> tuple[dict, Path]:
    data_dir = tmp_path / "store"
    return importers.import_source(_config(source, folder, tmp_path), data_dir), data_dir


def _assert_nothing_written(data_dir: Path) -> None:
    assert not data_dir.exists() or sorted(p.name for p in data_dir.iterdir()) == []


# (field, bad value, expected-type phrase): each a note on line 2 after one good note.
BAD_NOTES = [
    ("topics", "a,b", "a list of strings"),
    ("topics", ["a", 3], "a list of strings"),
    ("created_at", "yesterday", "integer unix seconds or an ISO-8601 date/time string"),
    ("created_at", None, "integer unix seconds or an ISO-8601 date/time string"),
    ("created_at", 1.5, "integer unix seconds or an ISO-8601 date/time string"),
    ("created_at", True, "integer unix seconds or an ISO-8601 date/time string"),
    ("note_id", 1.0, "a non-empty string or an integer"),
    ("note_id", "", "a non-empty string or an integer"),
    ("note_id", None, "a non-empty string or an integer"),
    ("category", None, "a string"),
    ("title", 5, "a string or null"),
    ("exposure", "12", "a non-negative integer, -1 or null"),
    ("exposure", -3, "a non-negative integer, -1 or null"),
]


@pytest.mark.parametrize("field,value,expected", BAD_NOTES, ids=[f"{f}={v!r}" for f, v, _ in BAD_NOTES])
def test_mistyped_note_field_names_file_line_and_field(tmp_path, field, value, expected):
    src = tmp_path / "src"
    src.mkdir()
    _jsonl(src / "notes.jsonl", [NOTE, {**NOTE, "note_id": "b", field: value}])
    _jsonl(src / "events.jsonl", [EVENT])
    pattern = rf"notes\.jsonl:2: field '{field}' must be {expected}, got {type(value).__name__} "
    with pytest.raises(InputFormatError, match=pattern.replace("(", r"\(").replace(")", r"\)")):
        _import("generic", src, tmp_path)
    _assert_nothing_written(tmp_path / "store")


@pytest.mark.parametrize("field,value", [("user_id", None), ("note_id", ["a"]), ("timestamp", "soon"),
                                         ("action", 7)])
def test_mistyped_event_field_names_file_line_and_field(tmp_path, field, value):
    src = tmp_path / "src"
    src.mkdir()
    _jsonl(src / "notes.jsonl", [NOTE])
    _jsonl(src / "events.jsonl", [EVENT, EVENT, {**EVENT, field: value}])
    with pytest.raises(InputFormatError, match=rf"events\.jsonl:3: field '{field}' must be "):
        _import("generic", src, tmp_path)
    _assert_nothing_written(tmp_path / "store")


def test_a_line_that_is_not_an_object(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "notes.jsonl").write_text(json.dumps(NOTE) + "\n[1, 2]\n")
    with pytest.raises(InputFormatError, match=r"notes\.jsonl:2: expected a JSON object, got list"):
        _import("generic", src, tmp_path)


def test_accepted_types_are_converted(tmp_path):
    """Integer ids become the same strings in notes and events; ISO-8601 times (naive = UTC, offsets
    honoured) become unix seconds; null title/content are empty; null exposure is -1."""
    src = tmp_path / "src"
    src.mkdir()
    _jsonl(src / "notes.jsonl", [
        {**NOTE, "note_id": 17, "created_at": "2020-01-02T03:04:05", "exposure": None},
        {**NOTE, "note_id": "b", "title": None, "created_at": "2020-01-02T05:04:05+02:00", "exposure": 4},
        {**NOTE, "note_id": "c", "content": None, "created_at": "2020-01-02", "topics": []}])
    _jsonl(src / "events.jsonl", [{**EVENT, "user_id": 5, "note_id": 17, "timestamp": "2021-06-01T00:00:00Z"}])
    stats, data_dir = _import("generic", src, tmp_path)
    utc = int(datetime(2020, 1, 2, 3, 4, 5, tzinfo=timezone.utc).timestamp())
    notes = store.read_note_table(data_dir / "notes.parquet").to_pylist()
    assert [(n["note_id"], n["title"], n["content"], n["created_at"], n["exposure"]) for n in notes] == [
        ("17", "A", "x", utc, -1), ("b", "", "x", utc, 4),
        ("c", "A", "", int(datetime(2020, 1, 2, tzinfo=timezone.utc).timestamp()), -1)]
    assert store.read_events(data_dir / "events.parquet").to_pylist() == [
        {"user_id": "5", "note_id": "17", "timestamp": int(datetime(2021, 6, 1, tzinfo=timezone.utc).timestamp()),
         "action": "click"}]
    assert stats["events_written"] == 1 and stats["skipped"]["event.unknown_note"] == 0


# ----------------------------------------------------------------------------- empty inputs


def test_empty_notes_jsonl_is_an_error_naming_the_input(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "notes.jsonl").write_text("\n")
    with pytest.raises(InputFormatError, match=rf"generic input {src}: no notes \(read 0 notes"):
        _import("generic", src, tmp_path)
    _assert_nothing_written(tmp_path / "store")


def test_notes_without_events_or_pairs_is_an_error(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _jsonl(src / "notes.jsonl", [NOTE])
    (src / "events.jsonl").write_text("")
    with pytest.raises(InputFormatError, match=rf"{src}: no events and no given pairs"):
        _import("generic", src, tmp_path)
    _jsonl(src / "events.jsonl", [{**EVENT, "note_id": "ghost"}])  # every event names an unknown note
    with pytest.raises(InputFormatError, match=r"no events and no given pairs"):
        _import("generic", src, tmp_path)
    _assert_nothing_written(tmp_path / "store")


@pytest.mark.parametrize("body", [b"", b'<?xml version="1.0" encoding="utf-8"?>\n<posts>\n</posts>\n'],
                         ids=["empty_file", "root_only"])
def test_empty_posts_xml_is_an_error(tmp_path, body):
    site = tmp_path / "dump" / "x.stackexchange.com"
    site.mkdir(parents=True)
    (site / "Posts.xml").write_bytes(body)
    expected = r"Posts\.xml: malformed XML at line 1" if not body else rf"{tmp_path / 'dump'}: no notes"
    with pytest.raises(InputFormatError, match=expected):
        _import("stackexchange", tmp_path / "dump", tmp_path)
    _assert_nothing_written(tmp_path / "store")


def test_zero_notes_after_skips_names_the_reasons(tmp_path):
    site = tmp_path / "dump" / "x.stackexchange.com"
    site.mkdir(parents=True)
    (site / "Posts.xml").write_text('<posts>\n  <row Id="1" PostTypeId="1" Title="no date" Body="b" />\n</posts>\n')
    with pytest.raises(InputFormatError, match=r"no notes \(read 0 notes; skipped: \{'question.missing_CreationDate': 1"):
        _import("stackexchange", tmp_path / "dump", tmp_path)


# ----------------------------------------------------------------------------- reference CSV


def test_csv_row_field_counts(tmp_path):
    header = "note_id,title,content,image_id,category\n"
    (tmp_path / "notes_x.csv").write_text(header + "n1,T,c\n")
    with pytest.raises(InputFormatError, match=r"notes_x\.csv:2: row has 3 fields, header has 5$"):
        _import("reference_csv", tmp_path, tmp_path)
    (tmp_path / "notes_x.csv").write_text(header + "n1,T,c,i,cat\nn2,T,c,i,cat,extra,more\n")
    with pytest.raises(InputFormatError, match=r"notes_x\.csv:3: row has 7 fields, header has 5$"):
        _import("reference_csv", tmp_path, tmp_path)
    _assert_nothing_written(tmp_path / "store")


@pytest.mark.parametrize("column,cell,expected", [
    ("created_at", "last week", "integer unix seconds or an ISO-8601"), ("exposure", "many", "a non-negative integer"),
    ("exposure", "-2", "a non-negative integer")])
def test_csv_mistyped_columns(tmp_path, column, cell, expected):
    (tmp_path / "notes_x.csv").write_text(f"note_id,title,content,image_id,category,{column}\n"
                                          f"n1,T,c,i,cat,1\nn2,T,c,i,cat,{cell}\n")
    with pytest.raises(InputFormatError, match=rf"notes_x\.csv:3: field '{column}' must be {expected}"):
        _import("reference_csv", tmp_path, tmp_path)


def test_csv_iso_created_at_and_bad_score(tmp_path):
    (tmp_path / "notes_x.csv").write_text("note_id,title,content,image_id,category,created_at\n"
                                          "n1,T,c,i,cat,2020-01-02\nn2,U,d,i,cat,7\n")
    (tmp_path / "note_pairs_x.csv").write_text("a,b,score\nn1,n2,nan\n")
    with pytest.raises(InputFormatError, match=r"note_pairs_x\.csv:2: field 'score' must be a finite number, got 'nan'"):
        _import("reference_csv", tmp_path, tmp_path)
    (tmp_path / "note_pairs_x.csv").write_text("a,b,score\nn1,n2,0.5\n")
    _, data_dir = _import("reference_csv", tmp_path, tmp_path)
    created = store.read_note_table(data_dir / "notes.parquet")["created_at"].to_pylist()
    assert created == [int(datetime(2020, 1, 2, tzinfo=timezone.utc).timestamp()), 7]
