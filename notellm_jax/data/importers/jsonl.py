"""Your own data (data.source = "generic"): notes.jsonl and events.jsonl in the folder data.input_path.

Both files are UTF-8 JSON lines: one JSON object per line, blank lines ignored. Fields not listed
below are ignored. Any malformed line (invalid JSON, not an object, a missing required field, a value
of the wrong type) stops the import with `file:line: ...` and nothing is written to the store.

notes.jsonl: one line per note (required).

    field       required  type                                 meaning
    note_id     yes       non-empty string, or integer          the note's id; an integer becomes its decimal
                                                                 string (the same in events.jsonl)
    title       yes       string or null                        null = empty title
    content     yes       string or null                        null = empty content
    topics      yes       list of strings (may be [])           the note's hashtags/topics: the answers of the
                                                                 hashtag-generation task
    category    yes       string                                the answer of the category-generation task
    created_at  yes       timestamp (below)                     when the note was created: the time split
                                                                 puts the latest notes in the test period
    exposure    no        integer >= 0, or -1, null or absent   view count; -1, null or absent = unknown
                                                                 (stored as -1)

A later line with an already seen note_id is skipped (the first is kept); a note whose title and
content are both empty is skipped; an empty title, empty content or [] topics is kept. Each skip and
each kept-but-empty field is counted in the import's stats (stats.json).

events.jsonl: the behaviour log, one line per user action on a note. Every field is required.

    field       type                           meaning
    user_id     non-empty string, or integer   who acted (an integer becomes its decimal string)
    note_id     non-empty string, or integer   which note; an event on a note absent from notes.jsonl is
                                               dropped and counted (event.unknown_note)
    timestamp   timestamp (below)              when
    action      string                         what, free text ("click", "like", "comment", ...); stored
                                               and counted per action; every action counts as a touch

Related-note pairs are mined from these events (user u touched A, then later B: data/cooccurrence.py),
so events.jsonl is needed in practice: an import with no event on a known note is an error naming the
input. The file may be absent only to check notes.jsonl alone (the import then fails with that error).

Timestamps are integer unix seconds (UTC) or ISO-8601 strings: "2020-01-02", "2020-01-02T03:04:05",
with "Z" or "+02:00" offsets; no offset means UTC. Both are stored as int64 unix seconds. Only
`title`, `content` and `exposure` may be null.

One line of each:

    {"note_id": "n1", "title": "Sourdough starter", "content": "Feed it daily.", "topics": ["baking"], "category": "food", "created_at": "2024-03-01T09:30:00Z", "exposure": 120}
    {"user_id": "u7", "note_id": "n1", "timestamp": 1709287200, "action": "click"}
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from notellm_jax.data import store
from notellm_jax.data.importers.builder import Record, StoreBuilder, utf8_error
from notellm_jax.errors import InputFormatError, MissingInputError


def _read_jsonl(path: Path, required: tuple[str, ...]) -> Iterator[Record]:
    """Records of a JSON-lines file; a bad line, a non-object or a missing field raises with file:line."""
    try:
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputFormatError(f"{path}:{line_number}:{e.colno}: invalid JSON: {e.msg}") from None
                if not isinstance(record, dict):
                    raise InputFormatError(f"{path}:{line_number}: expected a JSON object, got "
                                           f"{type(record).__name__}")
                missing = [k for k in required if k not in record]
                if missing:
                    raise InputFormatError(f"{path}:{line_number}: missing field(s) {missing}")
                yield Record(path, line_number, record)
    except UnicodeDecodeError:
        raise InputFormatError(f"{path}: not UTF-8 at {utf8_error(path)}") from None


def _generic_note(r: Record) -> dict[str, Any]:
    return {"note_id": r.identifier("note_id"), "title": r.text("title", nullable=True),
            "content": r.text("content", nullable=True), "topics": r.topics("topics"),
            "category": r.text("category"), "created_at": r.timestamp("created_at"), "exposure": r.count("exposure")}


def import_generic(folder: Path, builder: StoreBuilder) -> dict[str, Any]:
    """Import notes.jsonl (store fields; exposure optional, -1) and, if present, events.jsonl; field
    types as in the module docstring."""
    notes_path, events_path = folder / "notes.jsonl", folder / "events.jsonl"
    if not notes_path.is_file():
        raise MissingInputError(f"{notes_path} not found")
    required = tuple(n for n in store.NOTES_SCHEMA.names if n != "exposure")
    for record in _read_jsonl(notes_path, required):
        builder.add_note(_generic_note(record))
    if events_path.is_file():
        for r in _read_jsonl(events_path, tuple(store.EVENTS_SCHEMA.names)):
            builder.add_event(r.identifier("user_id"), r.identifier("note_id"), r.timestamp("timestamp"),
                              r.text("action"))
    return {"events_file": events_path.is_file()}
