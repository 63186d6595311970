"""The canonical note store: Parquet files with fixed schemas (pyarrow).

A prepared data folder holds (see `notellm_jax.data.prepare`):
- `notes.parquet`   one row per note: note_id, title, content, topics, category, created_at, exposure.
- `events.parquet`  the behaviour log: user_id, note_id, timestamp, action.
- `pairs_*.parquet` related-note pairs: note_a, note_b, score (s(A->B), or 1.0 for given pairs).
- `pairs_postlinks.parquet` explicit links between two notes: note_a, note_b, link_type.

Parquet is columnar (co-occurrence and splits read two or three columns of millions of events) and
streams: `NoteWriter` writes notes in row groups while an importer is still reading its source.
Timestamps are int64 unix seconds (UTC); `exposure` is the view count, -1 when the source has none.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from notellm_jax.data.prompts import Note
from notellm_jax.errors import MissingInputError, StoreFormatError

NOTES_SCHEMA = pa.schema([
    ("note_id", pa.string()),
    ("title", pa.string()),
    ("content", pa.string()),
    ("topics", pa.list_(pa.string())),
    ("category", pa.string()),
    ("created_at", pa.int64()),
    ("exposure", pa.int64()),
])
EVENTS_SCHEMA = pa.schema([
    ("user_id", pa.string()),
    ("note_id", pa.string()),
    ("timestamp", pa.int64()),
    ("action", pa.string()),
])
PAIRS_SCHEMA = pa.schema([
    ("note_a", pa.string()),
    ("note_b", pa.string()),
    ("score", pa.float64()),
])
LINKS_SCHEMA = pa.schema([
    ("note_a", pa.string()),
    ("note_b", pa.string()),
    ("link_type", pa.string()),
])

TableLike = pa.Table | Mapping[str, Any] | Iterable[Mapping[str, Any]]


def to_table(data: TableLike, schema: pa.Schema, what: str = "table") -> pa.Table:
    """Coerce a pyarrow Table, a dict of columns or an iterable of record dicts to `schema`.

    Extra columns are dropped; a missing column or a value of the wrong type raises StoreFormatError
    naming `what` (usually the file being written) and the field.
    """
    if isinstance(data, pa.Table):
        columns = {name: data.column(name) for name in data.column_names}
    elif isinstance(data, Mapping):
        columns = dict(data)
    else:
        records = list(data)
        for field in schema:
            missing = sum(field.name not in r for r in records)
            if missing:
                raise StoreFormatError(f"{what}: {missing} record(s) lack field {field.name!r}")
        columns = {field.name: [r[field.name] for r in records] for field in schema}
    arrays = []
    for field in schema:
        if field.name not in columns:
            raise StoreFormatError(f"{what}: missing column {field.name!r} (expected {schema.names})")
        column = columns[field.name]
        try:
            if isinstance(column, pa.ChunkedArray | pa.Array):
                arrays.append(column.cast(field.type))
            else:
                arrays.append(pa.array(column, type=field.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
            raise StoreFormatError(f"{what}: column {field.name!r} is not {field.type}: {e}") from None
    return pa.Table.from_arrays(arrays, schema=schema)


def _write(data: TableLike, schema: pa.Schema, path: str | Path) -> pa.Table:
    table = to_table(data, schema, str(path))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return table


def _read(path: str | Path, schema: pa.Schema) -> pa.Table:
    if not Path(path).is_file():
        raise MissingInputError(f"store file not found: {path}")
    table = pq.read_table(path)
    return to_table(table, schema, str(path))


def read_columns(path: str | Path, columns: tuple[str, ...] | list[str]) -> pa.Table:
    """Only `columns` of a store file (they must exist): for readers that need a few fields of big files."""
    if not Path(path).is_file():
        raise MissingInputError(f"{path} not found (run notellm_jax.data.prepare first)")
    names = pq.read_schema(path).names
    missing = [c for c in columns if c not in names]
    if missing:
        raise StoreFormatError(f"{path}: missing column(s) {missing} (has {names})")
    return pq.read_table(path, columns=list(columns))


def write_notes(data: TableLike, path: str | Path) -> pa.Table:
    """Write notes (Table, dict of columns, or records with NOTES_SCHEMA's fields) to Parquet."""
    return _write(data, NOTES_SCHEMA, path)


def read_note_table(path: str | Path) -> pa.Table:
    """Read a notes Parquet file as a Table with NOTES_SCHEMA (missing column -> StoreFormatError)."""
    return _read(path, NOTES_SCHEMA)


def write_events(data: TableLike, path: str | Path) -> pa.Table:
    """Write behaviour events (user_id, note_id, timestamp, action) to Parquet."""
    return _write(data, EVENTS_SCHEMA, path)


def read_events(path: str | Path) -> pa.Table:
    """Read an events Parquet file as a Table with EVENTS_SCHEMA (a null key field -> StoreFormatError)."""
    table = _read(path, EVENTS_SCHEMA)
    check_events(table, str(path))
    return table


EVENT_KEYS = ("user_id", "note_id", "timestamp")


def check_events(table: pa.Table, what: str, first_row: int = 0) -> None:
    """StoreFormatError naming `what`, the column and the row (first_row + index) for a missing key
    column, a key column of the wrong type, or a null user_id / note_id / timestamp."""
    for field in EVENTS_SCHEMA:
        if field.name not in EVENT_KEYS:
            continue
        if field.name not in table.column_names:
            raise StoreFormatError(f"{what}: missing column {field.name!r}")
        column = table[field.name]
        if column.null_count:
            row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise StoreFormatError(f"{what}: row {first_row + row}: {field.name} is null")
        if not column.type.equals(field.type):
            raise StoreFormatError(f"{what}: column {field.name!r} is {column.type}, not {field.type}")


def write_pairs(data: TableLike, path: str | Path) -> pa.Table:
    """Write scored pairs (note_a, note_b, score) to Parquet, keeping row order."""
    return _write(data, PAIRS_SCHEMA, path)


def read_pairs(path: str | Path) -> pa.Table:
    """Read a pairs Parquet file as a Table with PAIRS_SCHEMA, in stored row order."""
    return _read(path, PAIRS_SCHEMA)


def write_links(data: TableLike, path: str | Path) -> pa.Table:
    """Write explicit links (note_a, note_b, link_type) to Parquet."""
    return _write(data, LINKS_SCHEMA, path)


def read_links(path: str | Path) -> pa.Table:
    """Read an explicit-links Parquet file as a Table with LINKS_SCHEMA."""
    return _read(path, LINKS_SCHEMA)


class NoteWriter:
    """Streams note records into one Parquet file in row groups, so a dump never sits in memory.

    Writes to `<path>.tmp` and renames on `close()`, so an interrupted import leaves no notes file
    that a later stage (or a skipped stage) would take for complete.
    """

    def __init__(self, path: str | Path, row_group_size: int = 10_000):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._writer = pq.ParquetWriter(self._tmp, NOTES_SCHEMA)
        self._buffer: list[dict[str, Any]] = []
        self._row_group_size = row_group_size
        self.rows = 0

    def add(self, note: Mapping[str, Any]) -> None:
        self._buffer.append(dict(note))
        if len(self._buffer) >= self._row_group_size:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            self._writer.write_table(to_table(self._buffer, NOTES_SCHEMA, str(self.path)))
            self.rows += len(self._buffer)
            self._buffer = []

    def close(self) -> None:
        self._flush()
        self._writer.close()
        self._tmp.replace(self.path)


# ----------------------------------------------------------------------------------------------------
# Typed views: notes as `Note`s, the one reader of split.json, and which notes of a split

NOTE_COLUMNS = ("note_id", "title", "content", "topics", "category")


def load_notes(path: str | Path) -> list[Note]:
    """Notes in file order (= note_index); duplicate ids are an error, missing text becomes ""."""
    notes, seen = [], {}
    for row_number, row in enumerate(read_columns(path, NOTE_COLUMNS).to_pylist()):
        note_id = str(row["note_id"])
        if note_id in seen:
            raise StoreFormatError(f"{path}: duplicate note_id {note_id!r} at rows {seen[note_id]} and {row_number}")
        seen[note_id] = row_number
        notes.append(Note(note_id=note_id, title=row["title"] or "", content=row["content"] or "",
                          topics=[str(t) for t in row["topics"] or []], category=row["category"] or ""))
    return notes


def read_split(data_dir: str | Path) -> dict[str, Any]:
    """split.json of a prepared data folder (written by the splits stage)."""
    path = Path(data_dir) / "split.json"
    if not path.is_file():
        raise MissingInputError(f"{path} not found: run notellm_jax.data.prepare (splits stage) first")
    return json.loads(path.read_text())


def split_note_ids(data_dir: str | Path, split: str) -> list[str]:
    """The note ids of one split ("train" or "test"), in split.json order."""
    ids = read_split(data_dir).get(f"{split}_notes")
    if ids is None:
        raise StoreFormatError(f"{Path(data_dir) / 'split.json'}: no {split}_notes list")
    return [str(i) for i in ids]


NOTE_SPLITS = ("train", "test", "all")
NOTE_ORDERS = ("split", "file")


def notes_of(data_dir: str | Path, split: str | Sequence[str] = "test", order: str = "split",
             sample: int | None = None, seed: int = 0, notes: Sequence[Note] | None = None) -> list[Note]:
    """Which notes of a split: the one way every tool picks the notes it embeds, generates for or scores.

    `split`: "train" or "test" (split.json's lists), "all" (every note of notes.parquet), or a sequence of
    note ids (a selection of the caller's own). `order`: "split" keeps the split's own order (split.json's,
    or the ids' as given; notes.parquet's for "all"), "file" notes.parquet's. `sample`: at most that many
    notes, drawn uniformly without replacement (seeded by `seed`) and kept in `order`; not a prefix, since
    split.json lists notes grouped by category. `notes`: notes.parquet already loaded. A split.json id
    missing from notes.parquet is a StoreFormatError (the folder is inconsistent), a given one a ValueError.
    """
    if isinstance(split, str) and split not in NOTE_SPLITS:
        raise ValueError(f"split must be one of {NOTE_SPLITS} or a sequence of note ids, got {split!r}")
    if order not in NOTE_ORDERS:
        raise ValueError(f"order must be one of {NOTE_ORDERS}, got {order!r}")
    if sample is not None and sample < 1:
        raise ValueError(f"sample must be >= 1 (or None for every note), got {sample}")
    data_dir = Path(data_dir)
    notes = list(notes) if notes is not None else load_notes(data_dir / "notes.parquet")
    if split == "all":
        chosen = notes
    else:
        by_id = {n.note_id: n for n in notes}
        ids = list(dict.fromkeys(split_note_ids(data_dir, split) if isinstance(split, str) else map(str, split)))
        missing = [i for i in ids if i not in by_id]
        if missing and isinstance(split, str):
            raise StoreFormatError(f"{data_dir / 'split.json'}: {len(missing)} {split} note ids are not in "
                                   f"notes.parquet (e.g. {missing[:3]}); the data folder is inconsistent, rerun "
                                   "prepare --force")
        if missing:
            raise ValueError(f"{len(missing)} requested notes are not in notes.parquet: {sorted(missing)[:5]!r}")
        wanted = set(ids)
        chosen = [by_id[i] for i in ids] if order == "split" else [n for n in notes if n.note_id in wanted]
    if sample is not None and sample < len(chosen):
        keep = np.sort(np.random.default_rng(seed).choice(len(chosen), sample, replace=False))
        chosen = [chosen[i] for i in keep]
    return chosen
