"""Checks `notellm prepare` runs after each stage: a well-formed result that no run can use is an error
(`DataQualityError`: one line, exit 2) naming the file or folder, the field or count at fault, the likely
cause and the fix, instead of a zero in stats.json that `notellm train` trips over later.

- import: a timestamp field (notes' created_at, events' timestamp) whose median lies far in the future
  (more than a year from now) is named by the unit its magnitude suggests (milliseconds, microseconds,
  nanoseconds) with the data.timestamp_unit to set; a median before 1973 after an explicit "ms"/"us" unit
  looks like seconds read as that unit; any value after the year 9999 is refused; all notes sharing one
  created_at leave the time split nothing to split.
- cooccurrence: no related pair over the whole behaviour log.
- splits: all notes in one split (train or test), no training pairs, no validation pairs (when
  data.val_fraction > 0).
Negative timestamps never get here: the importers refuse them with file and line (importers/builder.py).
The failed stage's counts stay in stats.json with the message under "error"; its outputs are removed, so
the next `notellm prepare` redoes it.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from notellm_jax.config import Config
from notellm_jax.data import store
from notellm_jax.data.importers.builder import UNIT_NAME, magnitude_unit
from notellm_jax.errors import DataQualityError

YEAR = 366 * 86400
LAST_SECOND = 253402300799  # 9999-12-31T23:59:59Z, the last time datetime can show
SECONDS_READ_AS_UNIT = 1e8  # 1973-03-03: below this, an explicit "ms"/"us" unit likely divided seconds
LABELS = {"created_at": "notes", "timestamp": "events"}


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(min(max(seconds, 0), LAST_SECOND), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _where(counts: dict[str, Any], field: str) -> str:
    """The file a timestamp field came from (generic JSONL), else the source's notes/events."""
    used = counts.get("timestamp_units", {}).get(field)
    return Path(used["file"]).name if used else f"{counts.get('source', 'input')} {LABELS[field]}"


def _timestamp_problem(counts: dict[str, Any], field: str, summary: dict[str, Any], now: float) -> str | None:
    median, unit = summary["median"], counts.get("timestamp_units", {}).get(field, {}).get("unit", "s")
    head = f"{_where(counts, field)}: field {field!r}"
    if median > now + YEAR:
        guess = magnitude_unit(median * {"s": 1, "ms": 1e3, "us": 1e6}[unit])
        if guess in ("ms", "us"):
            return (f"{head} looks like {UNIT_NAME[guess]} (median {_sci(median)} read as {UNIT_NAME[unit]}, the "
                    f"year {_year(median)}); set data.timestamp_unit={guess!r} or 'auto'")
        if guess == "ns":
            return (f"{head} looks like nanoseconds (median {_sci(median)}), which are not supported; write "
                    f"seconds, milliseconds or microseconds")
        return (f"{head} lies far in the future (median {_iso(median)}); check the field's unit and the clock "
                f"that wrote it")
    if unit != "s" and median < SECONDS_READ_AS_UNIT:
        return (f"{head} looks like seconds read as {UNIT_NAME[unit]} (median {_iso(median)}); set "
                f"data.timestamp_unit='s' or 'auto'")
    if summary["max"] > LAST_SECOND:
        return (f"{head} has values after the year 9999 (max {summary['max']}, median {_iso(median)}); fix or "
                f"drop those records")
    return None


def _sci(value: float) -> str:
    return f"{value:.2g}".replace("e+", "e")


def _year(seconds: float) -> str:
    return f"{1970 + seconds / (365.2425 * 86400):,.0f}"


def check_import(config: Config, data_dir: Path, counts: dict[str, Any]) -> None:
    """Timestamps in a plausible range and unit; more than one creation time (module docstring)."""
    now = time.time()
    for field, summary in counts["timestamps"].items():
        problem = summary and _timestamp_problem(counts, field, summary, now)
        if problem:
            raise DataQualityError(problem)
    created = counts["timestamps"]["created_at"]
    if counts["notes_written"] > 1 and created["distinct"] == 1:
        raise DataQualityError(
            f"{_where(counts, 'created_at')}: field 'created_at': all {counts['notes_written']} notes share one "
            f"creation time ({_iso(created['min'])}), so the time split cannot separate train from test notes; "
            f"export each note's real creation time")


def check_cooccurrence(config: Config, data_dir: Path, counts: dict[str, Any]) -> None:
    """At least one related pair over the whole log."""
    if not len(store.read_pairs(data_dir / "pairs_all.parquet")):
        raise DataQualityError(
            f"{data_dir}: no related pairs over the whole behaviour log ({counts}); likely causes: users who "
            f"touch only one note each (field 'user_id' in the events), data.cooc_lower={config.data.cooc_lower} "
            f"too high, or data.cooc_window_days={config.data.cooc_window_days} too short")


def check_splits(config: Config, data_dir: Path, counts: dict[str, Any]) -> None:
    """Notes in both splits; training pairs; validation pairs unless data.val_fraction is 0."""
    notes, pairs, events = counts["notes"], counts["pairs"], counts["events"]
    for split, other in (("train", "test"), ("test", "train")):
        if not notes[split]:
            raise DataQualityError(
                f"{data_dir}: all {notes[other]} notes fall in the {other} split (cut-off quantile "
                f"data.test_time_quantile={config.data.test_time_quantile}, scope {config.data.split_scope!r}); "
                f"likely cause: too few distinct values of the notes' field 'created_at'")
    if not pairs["train"]:
        raise DataQualityError(
            f"{data_dir}: no training pairs ({events['train_period']} of {events['all']} events fall in the "
            f"training period, {notes['train']} training notes); likely causes: events' field 'timestamp' after "
            f"their note's cut-off (data.train_events_before_cutoff=False keeps them) or in another unit than "
            f"'created_at', or too few users who touch two training notes")
    if config.data.val_fraction > 0 and not pairs["val"]:
        raise DataQualityError(
            f"{data_dir}: no validation pairs ({pairs['train_before_cap']} training-period pairs, "
            f"{counts['val_source_notes']} source notes held out with data.val_fraction={config.data.val_fraction}); "
            f"raise data.val_fraction or add data (set it to 0 to train without validation)")


CHECKS = {"import": check_import, "cooccurrence": check_cooccurrence, "splits": check_splits}
