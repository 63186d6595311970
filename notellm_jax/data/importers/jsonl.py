"""Your own data (data.source = "generic"): notes.jsonl and events.jsonl in the folder data.input_path.

Both files are UTF-8 JSON lines: one JSON object per line, blank lines ignored; a UTF-8 byte-order
mark (BOM) at the start of a file is accepted. Any malformed line (invalid JSON, not an object, a
missing required field, a value of the wrong type, an integer that does not fit 64 bits, a timestamp
before 1970) stops the import with `file:line: ...` and nothing is written to the store.

Fields not listed below are ignored with a warning, once per file, that counts them and names the
nearest known field for a likely typo (`exposures` -> did you mean `exposure`?); the counts are in
stats.json (import.unknown_fields). With data.strict_fields=True an unknown field is an error naming
file, line and field.

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
content are both empty (or whitespace only) is skipped; an empty or whitespace-only title or content,
or [] topics, is kept. Each skip and each kept-but-empty field is counted in the import's stats
(stats.json: skipped, notes_flagged_kept).

events.jsonl: the behaviour log, one line per user action on a note. Every field is required.

    field       type                           meaning
    user_id     non-empty string, or integer   who acted (an integer becomes its decimal string)
    note_id     non-empty string, or integer   which note; an event on a note absent from notes.jsonl is
                                               dropped and counted (event.unknown_note)
    timestamp   timestamp (below)              when; an event before its note's created_at is kept
                                               and counted (events_flagged_kept.before_note_created)
    action      string                         what, free text ("click", "like", "comment", ...); stored
                                               and counted per action; every action counts as a touch

Related-note pairs are mined from these events (user u touched A, then later B: data/cooccurrence.py),
so events.jsonl is needed in practice: an import with no event on a known note is an error naming the
input. The file may be absent only to check notes.jsonl alone (the import then fails with that error).

Timestamps are numeric unix times (UTC) or ISO-8601 strings: "2020-01-02", "2020-01-02T03:04:05",
with "Z" or "+02:00" offsets; no offset means UTC. Both are stored as int64 unix seconds. A numeric
timestamp is an integer or an integral float (`1577836800.0`, as pandas writes it; `1.5` is refused)
in the unit data.timestamp_unit names: "s", "ms", "us", or "auto" (default), which decides per file
and field from the median of its first 10,000 numeric values (< 1e11 seconds, < 1e14 milliseconds,
< 1e17 microseconds); the unit used is reported in stats.json (import.timestamp_units). Times before
1970 are refused. After the import, `notellm prepare` refuses timestamps that still look mis-scaled
(milliseconds read as seconds, a median far in the future) and notes that all share one created_at,
naming the file, the field and the fix (data/checks.py). `exposure` may also be an integral float.
Only `title`, `content` and `exposure` may be null.

One line of each:

    {"note_id": "n1", "title": "Sourdough starter", "content": "Feed it daily.", "topics": ["baking"], "category": "food", "created_at": "2024-03-01T09:30:00Z", "exposure": 120}
    {"user_id": "u7", "note_id": "n1", "timestamp": 1709287200, "action": "click"}
"""
from __future__ import annotations

import difflib
import json
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from notellm_jax.data import store
from notellm_jax.data.importers.builder import (DETECT_SAMPLE, UNIT_SCALE, Record, StoreBuilder, detect_unit,
                                                integral, utf8_error)
from notellm_jax.errors import ConfigError, InputFormatError, MissingInputError

logger = logging.getLogger(__name__)
NOTE_FIELDS = tuple(store.NOTES_SCHEMA.names)
EVENT_FIELDS = tuple(store.EVENTS_SCHEMA.names)


def _read_jsonl(path: Path, required: tuple[str, ...]) -> Iterator[Record]:
    """Records of a JSON-lines file (a leading BOM skipped); a bad line, a non-object or a missing field
    raises with file:line."""
    try:
        with open(path, encoding="utf-8-sig") as f:
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


def _nearest(name: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class FieldCheck:
    """Unknown fields of one file: counted (a warning once per file) or, strict, an error at the first."""

    def __init__(self, path: Path, known: tuple[str, ...], strict: bool):
        self.path, self.known, self.strict = path, known, strict
        self.unknown: Counter[str] = Counter()

    def __call__(self, record: Record) -> Record:
        for name in record.values:
            if name not in self.known:
                if self.strict:
                    raise InputFormatError(f"{self.path}:{record.line}: unknown field {name!r}"
                                           f"{_nearest(name, self.known)}; data.strict_fields=True refuses "
                                           f"fields outside {list(self.known)}")
                self.unknown[name] += 1
        return record

    def report(self) -> dict[str, int]:
        if self.unknown:
            listed = ", ".join(f"{n!r} x{c}{_nearest(n, self.known)}" for n, c in sorted(self.unknown.items()))
            logger.warning("%s: unknown field(s) ignored: %s; known fields: %s (data.strict_fields=True makes "
                           "this an error)", self.path, listed, ", ".join(self.known))
        return dict(sorted(self.unknown.items()))


def _with_unit(records: Iterator[Record], field: str, unit: str) -> tuple[Iterator[Record], dict]:
    """The records with their numeric `field` scaled to seconds, and the unit used (detect_unit on the
    first DETECT_SAMPLE numeric values when unit="auto")."""
    if unit not in (*UNIT_SCALE, "auto"):
        raise ConfigError(f"data.timestamp_unit {unit!r}: s | ms | us | auto")
    head, sample = [], []
    if unit == "auto":
        for record in records:
            head.append(record)
            number = integral(record.values.get(field))
            if number is not None:
                sample.append(number)
                if len(sample) >= DETECT_SAMPLE:
                    break
    used = detect_unit(sample, unit)
    scale = UNIT_SCALE[used["unit"]]
    for record in head:
        record.unit_scale = scale

    def scaled() -> Iterator[Record]:
        yield from head
        for record in records:
            record.unit_scale = scale
            yield record
    return scaled(), used


def _generic_note(r: Record) -> dict[str, Any]:
    return {"note_id": r.identifier("note_id"), "title": r.text("title", nullable=True),
            "content": r.text("content", nullable=True), "topics": r.topics("topics"),
            "category": r.text("category"), "created_at": r.timestamp("created_at"), "exposure": r.count("exposure")}


def _read_file(path: Path, required: tuple[str, ...], known: tuple[str, ...], field: str, unit: str,
               strict: bool) -> tuple[Iterator[Record], FieldCheck, dict]:
    check = FieldCheck(path, known, strict)
    records, used = _with_unit(map(check, _read_jsonl(path, required)), field, unit)
    return records, check, used


def import_generic(folder: Path, builder: StoreBuilder, timestamp_unit: str = "auto",
                   strict_fields: bool = False) -> dict[str, Any]:
    """Import notes.jsonl (store fields; exposure optional, -1) and, if present, events.jsonl; field
    types, timestamp units and unknown fields as in the module docstring."""
    notes_path, events_path = folder / "notes.jsonl", folder / "events.jsonl"
    if not notes_path.is_file():
        raise MissingInputError(f"{notes_path} not found")
    required = tuple(n for n in NOTE_FIELDS if n != "exposure")
    records, check, used = _read_file(notes_path, required, NOTE_FIELDS, "created_at", timestamp_unit, strict_fields)
    for record in records:
        builder.add_note(_generic_note(record))
    units = {"created_at": {"file": str(notes_path), **used}}
    unknown = {notes_path.name: check.report()}
    if events_path.is_file():
        records, check, used = _read_file(events_path, EVENT_FIELDS, EVENT_FIELDS, "timestamp", timestamp_unit,
                                          strict_fields)
        for r in records:
            builder.add_event(r.identifier("user_id"), r.identifier("note_id"), r.timestamp("timestamp"),
                              r.text("action"))
        units["timestamp"] = {"file": str(events_path), **used}
        unknown[events_path.name] = check.report()
    return {"events_file": events_path.is_file(), "timestamp_units": units,
            "unknown_fields": {k: v for k, v in unknown.items() if v}}
