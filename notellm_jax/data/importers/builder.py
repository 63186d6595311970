"""The note store builder every importer feeds, and the field checks the sources share.

`StoreBuilder` owns the rules shared by all sources: duplicate note ids keep the first record; a note
with neither title nor content (empty or whitespace only) is unusable and skipped; an empty or
whitespace-only title or content, or no topics, is kept and counted (`notes_flagged_kept`); events,
links and pairs that name an unknown note are dropped and counted; an event dated before its note's
creation is kept and counted (`events_flagged_kept.before_note_created`: clocks and imports disagree,
and the behaviour is still real). Every
skipped record is counted under a reason in the returned stats. An import that yields no notes, or
neither events nor given pairs (nothing to build related pairs from), is an error naming the input.

Malformed input raises `InputFormatError` naming the file and the position (line/column for XML,
JSONL and CSV; byte offset for bytes that are not UTF-8, found by `utf8_error`). Inputs are decoded
strictly as UTF-8 (an XML file's BOM is accepted): a wrong encoding is an error, never silent
replacement characters.

`Record` checks the typed fields of one input record (generic JSONL; the CSV columns where they apply)
and reports `file:line: field 'x' must be ...`; the types are listed in `importers/jsonl.py`. Integers
must fit int64 (a value such as 10**20 is refused with file and line); timestamps and counts may be
integral floats (`1577836800.0`, as pandas writes them); timestamps before 1970 (negative) are refused.
Numeric timestamps are scaled to seconds by the record's `unit_scale` (`timestamp_unit`, `detect_unit`).
"""
from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
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
        self._created: dict[str, int] = {}
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
        blank_title, blank_content = not note["title"].strip(), not note["content"].strip()
        if blank_title and blank_content:
            self.skip("note.no_title_and_no_content")
            return False
        for flag, empty in (("empty_title", blank_title), ("empty_content", blank_content),
                            ("no_topics", not note["topics"])):
            self.flagged[flag] += int(empty)
        self._note_ids.add(note["note_id"])
        self._created[note["note_id"]] = note["created_at"]
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

    def _events_before_creation(self, events: pa.Table) -> int:
        """Kept events dated before their note's creation (counted, not dropped: module docstring)."""
        created = np.array([self._created[n] for n in events["note_id"].to_pylist()], np.int64)
        return int(np.sum(events["timestamp"].to_numpy() < created)) if len(events) else 0

    def _timestamp_summary(self, events: pa.Table) -> dict[str, dict[str, Any]]:
        """min/median/max/distinct of the stored seconds: what prepare's timestamp checks read."""
        columns = {"created_at": np.fromiter(self._created.values(), np.int64, len(self._created)),
                   "timestamp": events["timestamp"].to_numpy() if len(events) else np.zeros(0, np.int64)}
        return {name: {"min": int(v.min()), "median": float(np.median(v)), "max": int(v.max()),
                       "distinct": int(len(np.unique(v)))} if len(v) else {}
                for name, v in columns.items()}

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
            "events_flagged_kept": {"before_note_created": self._events_before_creation(events)},
            "timestamps": self._timestamp_summary(events),
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


INT64 = (-2 ** 63, 2 ** 63 - 1)
UNIT_SCALE = {"s": 1, "ms": 1_000, "us": 1_000_000}
UNIT_NAME = {"s": "seconds", "ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds"}
DETECT_SAMPLE = 10_000  # numeric timestamps per file/field that decide data.timestamp_unit="auto"


def magnitude_unit(median: float) -> str:
    """The unit a median unix time of this magnitude is most likely in: s < 1e11 (year 5138) <= ms < 1e14
    <= us < 1e17 <= ns."""
    for unit, bound in (("s", 1e11), ("ms", 1e14), ("us", 1e17)):
        if abs(median) < bound:
            return unit
    return "ns"


def detect_unit(values: list[float], unit: str) -> dict[str, Any]:
    """data.timestamp_unit for one file/field: `unit` itself unless "auto", which picks s/ms/us from the
    median of the sample (nanoseconds are not taken: they stay seconds and prepare's check names them)."""
    median = float(statistics.median(values)) if values else None
    if unit != "auto":
        return {"unit": unit, "detected": False, "sample_median": median, "sample_size": len(values)}
    found = magnitude_unit(median) if median is not None else "s"  # no numeric values: ISO strings only
    return {"unit": found if found in UNIT_SCALE else "s", "detected": True, "sample_median": median,
            "sample_size": len(values)}


def integral(value: Any) -> int | None:
    """An int, or a float with an integral value (`1577836800.0`), as int; else None (bools, 1.5, nan)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
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

    def __init__(self, path: Path, line: int, values: Mapping[str, Any], unit_scale: int = 1):
        self.path, self.line, self.values, self.unit_scale = path, line, values, unit_scale

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

    def _in_range(self, name: str, number: int) -> int:
        if not INT64[0] <= number <= INT64[1]:
            raise InputFormatError(f"{self.path}:{self.line}: field {name!r} is out of range: {number} does not "
                                   f"fit a 64-bit integer")
        return number

    def timestamp(self, name: str) -> int:
        """Unix seconds from an integer (or integral float) in the record's unit, or an ISO-8601 string;
        a time before 1970 is refused."""
        value = self.values.get(name)
        number = integral(value)
        if number is not None:
            seconds = self._in_range(name, number) // self.unit_scale
        elif isinstance(value, str):
            try:
                seconds = parse_timestamp(value)
            except (ValueError, OverflowError):
                raise self.error(name, "integer unix seconds or an ISO-8601 date/time string") from None
        else:
            raise self.error(name, "integer unix seconds or an ISO-8601 date/time string")
        if seconds < 0:
            raise InputFormatError(f"{self.path}:{self.line}: field {name!r} is before 1970 ({value!r}): negative "
                                   f"unix times are refused; check the field's unit and sign")
        return seconds

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
        number = integral(value)
        if number is not None and number >= -1:
            return self._in_range(name, number)
        raise self.error(name, "a non-negative integer, -1 or null")
