"""The reference code's CSV format: notes_*.csv (note_id, title, content, image_id, category; optional
created_at and exposure columns) and note_pairs_*.csv (two note id columns, optional score), read by
`import_reference_csv`. A short or long row, a missing column or a non-UTF-8 byte raises
`InputFormatError` with file and line.
"""
from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from notellm_jax.data.importers.builder import Record, StoreBuilder, utf8_error
from notellm_jax.errors import InputFormatError, MissingInputError


CSV_NOTE_COLUMNS = ("note_id", "title", "content", "image_id", "category")
# Inline hashtags "#tag#" (Xiaohongshu topics may end in "[话题]", which is not part of the tag).
HASHTAG = re.compile(r"#([^#\s]+)#")


def split_hashtags(content: str) -> tuple[str, list[str]]:
    """Content with its inline #tag# hashtags removed (they are the hashtag task's answers) and the tags."""
    topics = [t.removesuffix("[话题]") for t in HASHTAG.findall(content)]
    return " ".join(HASHTAG.sub(" ", content).split()), topics


def _read_csv(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) for each CSV row, after checking the header names every required column."""
    csv.field_size_limit(2**31 - 1)  # note contents can exceed the 128 KiB default
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            for column in required:
                if column not in header:
                    raise InputFormatError(f"{path}: missing column {column!r} (header: {header})")
            for row in reader:
                if None in row or any(row[c] is None for c in required):
                    # DictReader fills a short row's missing columns with None and puts a long row's extra
                    # cells in a list under the key None.
                    fields = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None, []))
                    raise InputFormatError(f"{path}:{reader.line_num}: row has {fields} fields, header has "
                                           f"{len(header)}")
                yield reader.line_num, row
    except UnicodeDecodeError:
        raise InputFormatError(f"{path}: not UTF-8 at {utf8_error(path)}") from None


def _csv_number(text: str | None) -> int | str | None:
    """A CSV cell as the typed checks see it: integer text -> int, empty -> None (absent), else the text."""
    if not text:
        return None
    return int(text) if re.fullmatch(r"-?\d+", text.strip()) else text


def import_reference_csv(folder: Path, builder: StoreBuilder, category_depth: int) -> dict[str, Any]:
    """Import notes_*.csv and note_pairs_*.csv (the reference code's format) from `folder`.

    category = the first `category_depth` levels of the '@'-joined path (0 = whole path). The CSV has
    no dates: created_at is an optional column (integer unix seconds or ISO-8601), else the note's
    ordinal over the files in name order (so a time split becomes a split by file order). exposure:
    optional column (a non-negative integer or -1), else -1. image_id
    is not stored. note_pairs files: the first two columns are note ids (an optional `score` column,
    else 1.0); they become given pairs.
    """
    note_files = sorted(folder.glob("notes_*.csv"))
    if not note_files:
        raise MissingInputError(f"{folder}: no notes_*.csv files")
    ordinal = 0
    for path in note_files:
        for line, row in _read_csv(path, CSV_NOTE_COLUMNS):
            content, topics = split_hashtags(row["content"])
            path_levels = row["category"].split("@")
            typed = Record(path, line, {k: _csv_number(row.get(k)) for k in ("created_at", "exposure")})
            created_at = typed.timestamp("created_at") if row.get("created_at") else ordinal
            exposure = typed.count("exposure")
            builder.add_note({"note_id": row["note_id"], "title": row["title"].strip(), "content": content,
                              "topics": topics, "category": "@".join(path_levels[:category_depth or None]),
                              "created_at": created_at, "exposure": exposure})
            ordinal += 1
    pair_files = sorted(folder.glob("note_pairs_*.csv"))
    for path in pair_files:
        _import_pair_csv(path, builder)
    return {"note_files": [p.name for p in note_files], "pair_files": [p.name for p in pair_files]}


def _import_pair_csv(path: Path, builder: StoreBuilder) -> None:
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    if len(header) < 2:
        raise InputFormatError(f"{path}: needs two note id columns, header is {header}")
    for line, row in _read_csv(path, tuple(header[:2])):
        try:
            score = float(row["score"]) if row.get("score") else 1.0
        except ValueError:
            score = math.nan
        if not math.isfinite(score):
            raise InputFormatError(f"{path}:{line}: field 'score' must be a finite number, got {row['score']!r}")
        builder.add_given_pair(row[header[0]], row[header[1]], score)
