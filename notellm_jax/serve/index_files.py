"""The live index's files, read as a database reads its own: every byte of the log is either a record whose
checksum verifies or a damaged range that is named (file, record number, byte offset), never an uncaught
exception; every snapshot file is checked before it is used. `LiveIndex.open` (index.py) refuses damage with
one line (`StoreFormatError` / `MissingInputError`) except an incomplete final log record (a torn write),
which it cuts off into a side file with a warning; `notellm index check|recover` (index_cli.py) list every
problem and rebuild a snapshot from what verifies.

Log records are "<crc32 of the body as 8 hex digits> <json body>\\n", the body an operation:
    {"op": "upsert", "id": str, "vector": [dim finite numbers], "title": str, "category": str}
    {"op": "delete", "id": str}
The final newline of a record whose checksum verifies may be missing (a cut right after the record): it is
kept. Limit: a cut exactly at a record boundary leaves a shorter log that is indistinguishable from one
that never held the later records (the log stores no count).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from notellm_jax.errors import MissingInputError, NotellmError, StoreFormatError
from notellm_jax.infer import ann

logger = logging.getLogger(__name__)

FORMAT = "notellm_jax.live_index/1"
CURRENT = "CURRENT"
SNAPSHOT = re.compile(r"snap-\d{6}")
LEFTOVER = re.compile(r"snap-\d{6}(\.log|\.tmp)?|CURRENT\.tmp")  # what a new snapshot replaces; side files stay
FLOAT32_MAX = float(np.finfo(np.float32).max)
_CRC = re.compile(rb"[0-9a-fA-F]{8}")
_PARTIAL_OP = re.compile(rb'"op":"(\w+)"(?:,"id":"((?:[^"\\]|\\.)*)("?))?')


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's entry list: renames and new files in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def record(op: dict[str, Any]) -> bytes:
    body = json.dumps(op, separators=(",", ":"), ensure_ascii=True).encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def holds_index(directory: Path) -> bool:
    """Whether the folder holds a live index, whole or damaged (CURRENT or any snapshot file)."""
    return directory.is_dir() and any(p.name == CURRENT or p.name.startswith("snap-") for p in directory.iterdir())


# --------------------------------------------------------------------------------------------------
# The log


@dataclasses.dataclass(frozen=True)
class LogRecord:
    number: int  # 1-based line number in the log
    offset: int  # byte offset of its first byte
    length: int  # bytes, its newline included when present
    op: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LogDamage:
    number: int
    offset: int
    data: bytes  # the damaged line, its newline included when present
    reason: str

    def describe(self) -> str:
        """What the damaged bytes were, as far as they can be read: e.g. the delete of note 'n3', a delete whose
        note id is cut off, or the first bytes themselves."""
        found = _PARTIAL_OP.search(self.data)
        if found is None:
            return f"{len(self.data)} bytes: {self.data[:48]!r}{'...' if len(self.data) > 48 else ''}"
        op, note, closed = found.group(1).decode("ascii", "replace"), found.group(2), found.group(3)
        if note is None:
            return f"{len(self.data)} bytes, apparently a {op} whose note id is cut off"
        note = note.decode("ascii", "replace")
        return (f"{len(self.data)} bytes, apparently the {op} of note {note!r}" if closed else
                f"{len(self.data)} bytes, apparently a {op} of a note whose id begins {note!r}")


@dataclasses.dataclass
class LogScan:
    """Every byte of the log accounted for: records that verify, damaged complete lines, and the torn tail (an
    incomplete final record, no newline after it)."""
    path: Path
    size: int
    records: list[LogRecord]
    damaged: list[LogDamage]
    torn: LogDamage | None
    missing_newline: bool  # the final record verifies but its newline is missing

    def problem(self, damage: LogDamage) -> Problem:
        return Problem(self.path, f"{damage.reason} ({damage.describe()})", damage.number, damage.offset)


def _float32(x: Any) -> bool:
    """A JSON number that float32 holds finite (no bool, no 1e300 or a 400-digit integer turning into inf)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(float(x)) and abs(float(x)) <= FLOAT32_MAX
    except OverflowError:
        return False


def op_problem(op: Any, dim: int | None) -> str | None:
    """Why a decoded body is not an operation this index applies (None when it is one)."""
    if not isinstance(op, dict):
        return f"the body is a JSON {type(op).__name__}, not an operation"
    if op.get("op") not in ("upsert", "delete"):
        return f"unknown operation {str(op.get('op'))[:40]!r} (upsert or delete)"
    if not isinstance(op.get("id"), str) or not op["id"]:
        return "its id is not a non-empty string"
    if op["op"] == "delete":
        return None
    vector = op.get("vector")
    if not isinstance(vector, list) or not all(_float32(x) for x in vector):
        return "its vector is not a list of finite numbers"
    if dim is not None and len(vector) != dim:
        return f"its vector has {len(vector)} dimensions, the index {dim}"
    if not all(isinstance(op.get(field, ""), str) for field in ("title", "category")):
        return "its title or category is not a string"
    return None


def parse_record(line: bytes, dim: int | None) -> tuple[dict[str, Any] | None, str]:
    """(the operation, "") for a line (without its newline) that verifies, else (None, why not)."""
    crc, sep, body = line.partition(b" ")
    if not sep or not _CRC.fullmatch(crc):
        return None, "no checksum (8 hex digits and a space)"
    if int(crc, 16) != zlib.crc32(body):
        return None, "checksum mismatch"
    try:
        op = json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        return None, f"the checksum verifies but the body is not JSON ({type(e).__name__})"
    problem = op_problem(op, dim)
    return (None, f"the checksum verifies but {problem}") if problem else (op, "")


def scan_log(data: bytes, path: Path, dim: int | None = None) -> LogScan:
    """Split the log into records that verify, damaged lines and a torn tail. Never raises on any bytes."""
    lines = data.split(b"\n")
    scan = LogScan(path, len(data), [], [], None, False)
    offset = 0
    for number, line in enumerate(lines, start=1):
        last = number == len(lines)  # what follows the last newline: empty, torn, or a record without newline
        if last and not line:
            break
        length = len(line) + (0 if last else 1)
        op, reason = parse_record(line, dim)
        if op is not None:
            scan.records.append(LogRecord(number, offset, length, op))
            scan.missing_newline = last
        elif last:
            scan.torn = LogDamage(number, offset, line, f"incomplete final record: {reason}")
        else:
            scan.damaged.append(LogDamage(number, offset, line + b"\n", reason))
        offset += length
    return scan


def read_log(path: Path, dim: int | None = None) -> LogScan:
    """The log as `LiveIndex.open` needs it: missing, or any damaged record but the torn tail, is an error."""
    if not path.is_file():
        raise Problem(path, "missing: the writes acknowledged since the snapshot cannot be known",
                      missing=True).error(path.parent)
    scan = scan_log(path.read_bytes(), path, dim)
    if scan.damaged:
        damage = scan.damaged[0]
        why = ("and it is not the final record" if damage.offset + len(damage.data) < scan.size else
               "a complete final record (its newline is there), so not a torn write")
        first = scan.problem(damage)
        raise dataclasses.replace(first, message=f"{first.message}, {why}: the log was damaged after it was "
                                  "written").error(path.parent, len(scan.damaged) - 1)
    return scan


def set_aside_torn_tail(scan: LogScan) -> dict[str, Any]:
    """Cut the torn tail off the log (so the next record does not follow garbage), its bytes kept in a side file
    `<log>.torn-<offset>` first; a warning names the file, offset and bytes. Returns the repair's record."""
    torn = scan.torn
    side = scan.path.with_name(f"{scan.path.name}.torn-{torn.offset}")
    copy = 1
    while side.exists():
        side, copy = scan.path.with_name(f"{scan.path.name}.torn-{torn.offset}.{copy}"), copy + 1
    write_durable(side, torn.data)
    fsync_path(scan.path.parent)
    os.truncate(scan.path, torn.offset)
    fsync_path(scan.path)
    repair = {"kind": "torn_tail", "file": str(scan.path), "record": torn.number, "offset": torn.offset,
              "bytes": len(torn.data), "dropped": torn.describe(), "side_file": str(side)}
    logger.warning("%s: dropped an incomplete final record (record %d at byte %d: %s; a write cut by a crash, or a "
                   "cut file); its bytes are kept in %s", scan.path, torn.number, torn.offset, torn.describe(), side)
    return repair


# --------------------------------------------------------------------------------------------------
# Snapshots


@dataclasses.dataclass(frozen=True)
class Problem:
    """One damaged thing, named by file (and record and byte offset in a log)."""
    path: Path
    message: str
    record: int | None = None
    offset: int | None = None
    missing: bool = False

    def __str__(self) -> str:
        where = f": record {self.record} at byte {self.offset}" if self.record is not None else ""
        return f"{self.path}{where}: {' '.join(self.message.splitlines())}"  # one line, whatever a library said

    def error(self, directory: Path, more: int = 0) -> NotellmError:
        """The one-line error that refuses to open the index in `directory`."""
        extra = f"; {more} more problem(s)" if more else ""
        in_snapshot = SNAPSHOT.fullmatch(self.path.name) or SNAPSHOT.fullmatch(self.path.parent.name)
        recover = "" if in_snapshot else (f", `notellm index recover {directory}` writes a new snapshot from "
                                          "what verifies")
        return (MissingInputError if self.missing else StoreFormatError)(
            f"{self}{extra}; `notellm index check {directory}` lists every problem{recover}")


@dataclasses.dataclass
class Snapshot:
    name: str
    meta: dict[str, Any]
    ids: list[str]
    vectors: np.ndarray
    notes: dict[str, dict[str, str]]
    raw: Any  # ScaNN's ScannNumpy

    @property
    def params(self) -> ann.ScannParams:
        return ann.ScannParams(**self.meta["params"])


def current_snapshot(directory: Path) -> tuple[str | None, list[Problem]]:
    """The snapshot CURRENT names, or the problems with CURRENT. A folder without CURRENT or any snapshot holds
    no index (MissingInputError); one without CURRENT but with snapshots is damaged."""
    path = directory / CURRENT
    if not path.is_file():
        snaps = sorted(p.name for p in directory.iterdir() if p.name.startswith("snap-")) if directory.is_dir() else []
        if not snaps:
            raise MissingInputError(f"{directory} holds no live index (no {CURRENT}); `notellm serve --embeddings "
                                    "DIR` builds one from offline embeddings")
        return None, [Problem(path, f"missing, but the folder holds {snaps[:4]}: the index is damaged", missing=True)]
    name = path.read_bytes().decode("utf-8", "replace").strip()
    if not name:
        return None, [Problem(path, "empty: it must name the live snapshot (snap-NNNNNN)")]
    if not SNAPSHOT.fullmatch(name):
        return None, [Problem(path, f"names {name[:60]!r}, not a snapshot (snap-NNNNNN)")]
    if not (directory / name).is_dir():
        return None, [Problem(path, f"names {name}, which is missing", missing=True)]
    return name, []


def _read_json(path: Path, problems: list[Problem]) -> Any:
    if not path.is_file():
        problems.append(Problem(path, "missing", missing=True))
        return None
    try:
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:
        problems.append(Problem(path, f"not JSON ({str(e)[:80]})"))
        return None


def _check_meta(path: Path, meta: Any, problems: list[Problem]) -> dict[str, Any] | None:
    if meta is None:
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        problems.append(Problem(path, f"format {found!r}, expected {FORMAT!r}"))
        return None
    try:
        ann.ScannParams(**meta["params"])
        ok = all(isinstance(meta[key], int) and meta[key] >= 0 for key in ("dim", "count"))
    except (KeyError, TypeError):
        ok = False
    if not ok:
        problems.append(Problem(path, "dim, count or params missing or malformed"))
        return None
    return meta


def _load_vectors(path: Path, meta: dict[str, Any] | None, problems: list[Problem]) -> np.ndarray | None:
    if not path.is_file():
        problems.append(Problem(path, "missing", missing=True))
        return None
    try:
        vectors = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        problems.append(Problem(path, f"unreadable, truncated or not a .npy array ({str(e)[:80]})"))
        return None
    expected = (meta["count"], meta["dim"]) if meta else None
    if vectors.ndim != 2 or (expected and vectors.shape != expected) or not np.isfinite(vectors).all():
        problems.append(Problem(path, f"shape {vectors.shape} (index.json: {expected}) or non-finite values"))
        return None
    return vectors.astype(np.float32)


def _check_ids(path: Path, ids: Any, meta: dict[str, Any] | None, problems: list[Problem]) -> list[str] | None:
    if ids is None:
        return None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        problems.append(Problem(path, "not a JSON list of note ids (strings)"))
    elif meta and len(ids) != meta["count"]:
        problems.append(Problem(path, f"{len(ids)} ids, index.json says {meta['count']}"))
    elif len(set(ids)) != len(ids):
        problems.append(Problem(path, "holds duplicate ids"))
    else:
        return ids
    return None


def _load_scann(snap: Path, meta: dict[str, Any] | None, problems: list[Problem]):
    try:
        raw = ann.load_index(snap).searcher
    except (RuntimeError, OSError, ValueError, NotellmError) as e:  # ScaNN reports damaged assets as RuntimeError
        problems.append(Problem(snap, f"the ScaNN assets do not load ({str(e).splitlines()[0][:120]})"))
        return None
    if meta and raw.size() != meta["count"]:
        problems.append(Problem(snap, f"ScaNN holds {raw.size()} points, index.json says {meta['count']}"))
        return None
    return raw


def load_snapshot(directory: Path, name: str) -> tuple[Snapshot | None, list[Problem]]:
    """The snapshot with every file checked; (None, every problem found) when any is damaged."""
    snap, problems = directory / name, []
    meta = _check_meta(snap / "index.json", _read_json(snap / "index.json", problems), problems)
    ids = _check_ids(snap / "ids.json", _read_json(snap / "ids.json", problems), meta, problems)
    vectors = _load_vectors(snap / "vectors.npy", meta, problems)
    notes = _read_json(snap / "notes.json", problems)
    if notes is not None and not (isinstance(notes, dict) and all(isinstance(v, dict) for v in notes.values())):
        problems.append(Problem(snap / "notes.json", "not a JSON object of id -> {title, category}"))
    raw = _load_scann(snap, meta, problems)
    if problems:
        return None, problems
    return Snapshot(name, meta, ids, vectors, notes, raw), []
