"""The note store builder every importer feeds, and the field checks the sources share.

`StoreBuilder` owns the rules shared by all sources: duplicate note ids keep the first record; a note
with neither title nor content is unusable and skipped; an empty title, empty content or no topics is
kept and counted; events, links and pairs that name an unknown note are dropped and counted. Every
skipped record is counted under a reason in the returned stats. An import that yields no notes, or
neither events nor given pairs (nothing to build related pairs from), is an error naming the input.

Malformed input raises `InputFormatError` naming the file and the position (line/column for XML,
JSONL and CSV; byte offset for bytes that are not UTF-8, found by `utf8_error`). Inputs are decoded
strictly as UTF-8 (an XML file's BOM is accepted): a wrong encoding is an error, never silent
replacement characters.

`Record` checks the typed fields of one input record (generic JSONL; the CSV columns where they apply)
and reports `file:line: field 'x' must be ...`; the types are listed in `importers/jsonl.py`.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from notellm_jax.data import store
from notellm_jax.errors import InputFormatError


class StoreBuilder:
    """Collects notes (streamed to Parquet), events, explicit links and given pairs, with counts.

    `finish()` validates events/links/pairs against the note ids and writes the store files; the
    notes file is renamed into place last, so its presence means the import completed.
    """

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self._notes = store.NoteWriter(self.data_dir / "notes.parquet")
        self._note_ids: set[str] = set()
        self._events: dict[str, list[Any]] = {name: [] for name in store.EVENTS_SCHEMA.names}
        self._links: list[tuple[str, str, str]] = []
        self._given_pairs: list[tuple[str, str, float]] = []
        self.skipped: Counter[str] = Counter()
        self.flagged: Counter[str] = Counter()
        self.notes_read = 0

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def add_note(self, note: Mapping[str, Any]) -> bool:
        """Add one note record (NOTES_SCHEMA fields); False when skipped (counted by reason)."""
        self.notes_read += 1
        if note["note_id"] in self._note_ids:
            self.skip("note.duplicate_id")
            return False
        if not note["title"] and not note["content"]:
            self.skip("note.no_title_and_no_content")
            return False
        for flag, empty in (("empty_title", not note["title"]), ("empty_content", not note["content"]),
                            ("no_topics", not note["topics"])):
            self.flagged[flag] += int(empty)
        self._note_ids.add(note["note_id"])
        self._notes.add(note)
        return True

    def add_event(self, user_id: str, note_id: str, timestamp: int, action: str) -> None:
        for name, value in zip(store.EVENTS_SCHEMA.names, (user_id, note_id, timestamp, action)):
            self._events[name].append(value)

    def add_link(self, note_a: str, note_b: str, link_type: str) -> None:
        self._links.append((note_a, note_b, link_type))

    def add_given_pair(self, note_a: str, note_b: str, score: float) -> None:
        self._given_pairs.append((note_a, note_b, score))

    def _known_pairs(self, rows: list[tuple], kind: str) -> list[tuple]:
        """Rows whose two notes exist, minus self-pairs and repeats (first kept), all counted."""
        kept, seen = [], set()
        for row in rows:
            key = (row[0], row[1])
            if row[0] not in self._note_ids or row[1] not in self._note_ids:
                self.skip(f"{kind}.unknown_note")
            elif row[0] == row[1]:
                self.skip(f"{kind}.self_pair")
            elif key in seen:
                self.skip(f"{kind}.duplicate")
            else:
                seen.add(key)
                kept.append(row)
        return kept

    def _known_events(self) -> pa.Table:
        events = store.to_table(self._events, store.EVENTS_SCHEMA, "events")
        known = pc.is_in(events["note_id"], value_set=pa.array(sorted(self._note_ids), pa.string()))
        self.skipped["event.unknown_note"] += len(events) - (pc.sum(known).as_py() or 0)
        return events.filter(known)

    def finish(self, source: str) -> dict[str, Any]:
        """Write events/links/given pairs, then the notes file; return the import counts.

        An import without notes, or without events and given pairs, is refused (InputFormatError naming
        `source`) before anything is written."""
        events = self._known_events()
        given = self._known_pairs(self._given_pairs, "given_pair")
        skipped = f"(read {self.notes_read} notes; skipped: {dict(self.skipped) or 'none'})"
        if not self._note_ids:
            raise InputFormatError(f"{source}: no notes {skipped}")
        if not len(events) and not given:
            raise InputFormatError(f"{source}: no events and no given pairs, nothing to build related pairs "
                                   f"from {skipped}")
        store.write_events(events, self.data_dir / "events.parquet")
        links = self._known_pairs(self._links, "link")
        store.write_links({name: [r[i] for r in links] for i, name in enumerate(store.LINKS_SCHEMA.names)},
                          self.data_dir / "pairs_postlinks.parquet")
        store.write_pairs({name: [r[i] for r in given] for i, name in enumerate(store.PAIRS_SCHEMA.names)},
                          self.data_dir / "pairs_given.parquet")
        self._notes.close()
        actions = pc.value_counts(events["action"]).to_pylist() if len(events) else []
        return {
            "notes_read": self.notes_read,
            "notes_written": self._notes.rows,
            "notes_flagged_kept": dict(sorted(self.flagged.items())),
            "events_written": len(events),
            "events_per_action": {a["values"]: a["counts"] for a in sorted(actions, key=lambda a: a["values"])},
            "users": len(pc.unique(events["user_id"])) if len(events) else 0,
            "notes_with_events": len(pc.unique(events["note_id"])) if len(events) else 0,
            "links_written": len(links),
            "given_pairs_written": len(given),
            "skipped": dict(sorted(self.skipped.items())),
        }

    def abort(self) -> None:
        """Drop the partial notes file after a failed import."""
        self._notes.close()
        (self.data_dir / "notes.parquet").unlink(missing_ok=True)


def utf8_error(path: Path) -> str | None:
    """'byte offset N (line L): invalid UTF-8 byte 0x..' for the first undecodable byte, else None."""
    offset = 0
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return (f"byte offset {offset + e.start} (line {line_number}): invalid UTF-8 byte "
                        f"0x{line[e.start]:02x}")
            offset += len(line)
    return None


def parse_timestamp(text: str) -> int:
    """ISO-8601 date/time -> unix seconds; without an offset it is UTC (as the dump dates
    "2016-08-02T15:39:14.947" and "2010-12-14" are)."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp())


class Record:
    """One input record's position (file:line), with the typed-field checks of its values."""

    def __init__(self, path: Path, line: int, values: Mapping[str, Any]):
        self.path, self.line, self.values = path, line, values

    def error(self, name: str, expected: str) -> InputFormatError:
        value = self.values.get(name)
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        return InputFormatError(f"{self.path}:{self.line}: field {name!r} must be {expected}, got "
                                f"{type(value).__name__} {shown}")

    def identifier(self, name: str) -> str:
        value = self.values.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, str) and value:
            return value
        raise self.error(name, "a non-empty string or an integer")

    def timestamp(self, name: str) -> int:
        value = self.values.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return parse_timestamp(value)
            except ValueError:
                pass
        raise self.error(name, "integer unix seconds or an ISO-8601 date/time string")

    def text(self, name: str, nullable: bool = False) -> str:
        value = self.values.get(name)
        if isinstance(value, str):
            return value
        if value is None and nullable:
            return ""
        raise self.error(name, "a string or null" if nullable else "a string")

    def topics(self, name: str) -> list[str]:
        value = self.values.get(name)
        if isinstance(value, list) and all(isinstance(t, str) for t in value):
            return value
        raise self.error(name, "a list of strings")

    def count(self, name: str) -> int:
        """An optional count: a non-negative integer, or -1, null or absent for unknown (stored as -1)."""
        value = self.values.get(name)
        if value is None:
            return -1
        if isinstance(value, int) and not isinstance(value, bool) and value >= -1:
            return value
        raise self.error(name, "a non-negative integer, -1 or null")
