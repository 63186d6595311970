"""`notellm index check DIR` and `notellm index recover DIR`: the live index's files verified and repaired by an
operator (the service's start, `LiveIndex.open`, repairs only a torn final log record and refuses the rest).

    check    verify CURRENT, every snapshot file and every log record; print every problem found (file, record,
             byte offset) and a summary of what verifies; exit status 2 on any problem, 0 when all is well.
    recover  write a NEW snapshot from the last snapshot that loads plus every log record that verifies, those
             after a damaged record included (records are independent upserts and deletes, applied in order by
             the replay's rules: an upsert of a stored id replaces it, a delete of an unknown id is skipped).
             The old files are first kept aside, whole, in DIR/aside-<UTC time>/ (hard links, else copies):
             nothing is deleted. Prints what was kept and what was dropped.

Neither takes --config: the index folder records its own ScaNN parameters. Stop the service before `recover`
(it rewrites CURRENT under a running one); `check` only reads.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any

from notellm_jax.config import RetrievalConfig
from notellm_jax.errors import StoreFormatError
from notellm_jax.infer import ann
from notellm_jax.serve.index import LiveIndex
from notellm_jax.serve.index_files import (CURRENT, SNAPSHOT, LogRecord, LogScan, Problem, Snapshot, current_snapshot,
                                           fsync_path, load_snapshot, scan_log)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("check", "recover"),
                        help="check: list every problem (exit 2 on any); recover: a new snapshot from what verifies")
    parser.add_argument("directory", metavar="DIR", help="the live index folder (`notellm serve --index DIR`)")


@dataclasses.dataclass
class Inspection:
    """What `check` found: every problem, summary lines, and what loaded."""
    directory: Path
    problems: list[Problem] = dataclasses.field(default_factory=list)
    lines: list[str] = dataclasses.field(default_factory=list)
    snapshot: Snapshot | None = None
    scan: LogScan | None = None


def snapshot_folders(directory: Path) -> list[str]:
    """The snapshot folders in the index folder, newest first."""
    return sorted((p.name for p in directory.iterdir() if p.is_dir() and SNAPSHOT.fullmatch(p.name)), reverse=True)


def inspect(directory: Path) -> Inspection:
    """Every problem of the index folder: CURRENT, the snapshot it names (else the newest one), its log."""
    found = Inspection(directory)
    try:
        ann.refuse_pickles(directory)
    except StoreFormatError as e:
        found.problems.append(Problem(directory, str(e).split(": ", 1)[-1]))
    name, problems = current_snapshot(directory)
    found.problems += problems
    name = name or next(iter(snapshot_folders(directory)), None)
    if name is None:
        return found
    found.snapshot, problems = load_snapshot(directory, name)
    found.problems += problems
    if found.snapshot is not None:
        found.lines.append(f"{directory / name}: {len(found.snapshot.ids)} notes, dim {found.snapshot.meta['dim']}: OK")
    _inspect_log(found, directory / f"{name}.log")
    for side in sorted(p.name for p in directory.iterdir() if ".torn-" in p.name or p.name.startswith("aside-")):
        found.lines.append(f"kept from an earlier repair or recovery: {directory / side}")
    return found


def _inspect_log(found: Inspection, path: Path) -> None:
    if not path.is_file():
        found.problems.append(Problem(path, "missing: the writes acknowledged since the snapshot cannot be known",
                                      missing=True))
        return
    snapshot = found.snapshot
    scan = found.scan = scan_log(path.read_bytes(), path, snapshot.meta["dim"] if snapshot else None)
    found.problems += [scan.problem(damage) for damage in scan.damaged]
    if scan.torn is not None:
        problem = scan.problem(scan.torn)
        found.problems.append(dataclasses.replace(problem, message=f"{problem.message}; opening the index cuts it "
                                                  "off into a side file"))
    if snapshot is not None:
        for entry in unknown_deletes(snapshot.ids, scan.records):
            found.problems.append(Problem(path, f"deletes note {entry.op['id']!r}, which the index does not hold "
                                          "there (replay skips it)", entry.number, entry.offset))
    upserts = sum(entry.op["op"] == "upsert" for entry in scan.records)
    found.lines.append(f"{path}: {len(scan.records)} records verify ({upserts} upserts, {len(scan.records) - upserts} "
                       f"deletes), {len(scan.damaged)} damaged, "
                       f"{f'a torn tail of {len(scan.torn.data)} bytes' if scan.torn else 'no torn tail'}"
                       f"{'; the final newline is missing (kept)' if scan.missing_newline else ''}")


def unknown_deletes(ids: list[str], records: list[LogRecord]) -> list[LogRecord]:
    """The logged deletes of ids that the snapshot plus the records before them do not hold."""
    held, unknown = set(ids), []
    for entry in records:
        if entry.op["op"] == "upsert":
            held.add(entry.op["id"])
        elif entry.op["id"] in held:
            held.discard(entry.op["id"])
        else:
            unknown.append(entry)
    return unknown


def check(directory: Path) -> Inspection:
    found = inspect(directory)
    for line in found.lines:
        print(line)
    for problem in found.problems:
        print(f"problem: {problem}")
    if found.problems:
        raise StoreFormatError(f"{directory}: {len(found.problems)} problem(s) found (listed above); `notellm index "
                               f"recover {directory}` writes a new snapshot from what verifies")
    print(f"{directory}: OK")
    return found


def keep_aside(directory: Path) -> Path:
    """Every file of the index (CURRENT, snapshots, logs, side files) into DIR/aside-<UTC time>/, as hard links
    (copies where the file system has none), fsynced: the new snapshot's clean-up then deletes nothing."""
    aside = directory / time.strftime("aside-%Y%m%dT%H%M%SZ", time.gmtime())
    suffix = 1
    while aside.exists():
        aside, suffix = aside.with_name(f"{aside.name.split('.')[0]}.{suffix}"), suffix + 1
    aside.mkdir()
    for path in sorted(directory.iterdir()):
        if path.name == CURRENT or path.name.startswith(("snap-", f"{CURRENT}.")):
            if path.is_dir():
                shutil.copytree(path, aside / path.name, copy_function=_link_or_copy)
                fsync_path(aside / path.name)
            else:
                _link_or_copy(path, aside / path.name)
    fsync_path(aside)
    fsync_path(directory)
    return aside


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
        fsync_path(Path(dst))


def _base_snapshot(found: Inspection) -> Snapshot:
    """The snapshot `check` loaded, else the newest snapshot folder that loads (older ones only after a crash)."""
    if found.snapshot is not None:
        return found.snapshot
    for name in snapshot_folders(found.directory):
        snapshot, _ = load_snapshot(found.directory, name)
        if snapshot is not None:
            print(f"warning: the snapshot CURRENT names does not load; recovering from {found.directory / name}")
            return snapshot
    first = found.problems[0] if found.problems else "no snapshot folder"
    raise StoreFormatError(f"{found.directory}: no snapshot loads, nothing to recover from ({first})")


def recover(directory: Path) -> dict[str, Any]:
    """A new snapshot from the last one that loads plus every log record that verifies; see the module doc."""
    found = inspect(directory)
    if not found.problems:
        print(f"{directory}: no problem found, nothing to recover")
        return {"recovered": False}
    base = _base_snapshot(found)
    scan = found.scan if found.snapshot is not None else None
    if scan is None and (directory / f"{base.name}.log").is_file():
        scan = scan_log((directory / f"{base.name}.log").read_bytes(), directory / f"{base.name}.log",
                        base.meta["dim"])
    index = LiveIndex(directory, base.raw, base.params, base.ids, base.vectors, base.notes, base.name,
                      RetrievalConfig())
    records = scan.records if scan else []
    for entry in records:
        index.replay_record(entry)
    aside = keep_aside(directory)
    name = index.snapshot(number=int(snapshot_folders(directory)[0].split("-")[1]) + 1)
    index.close()
    summary = {"recovered": True, "from": base.name, "records_kept": len(records),
               "dropped": [str(scan.problem(d)) for d in scan.damaged + ([scan.torn] if scan.torn else [])]
               if scan else [], "skipped_deletes": index.skipped_deletes, "snapshot": name, "notes": len(index),
               "aside": str(aside)}
    _print_recovery(directory, base, summary, scan)
    return summary


def _print_recovery(directory: Path, base: Snapshot, summary: dict[str, Any], scan: LogScan | None) -> None:
    print(f"kept: {directory / base.name} ({len(base.ids)} notes) and {summary['records_kept']} log record(s) that "
          f"verify{'' if scan else ' (the log is missing: the writes since the snapshot are lost)'}")
    for dropped in summary["dropped"]:
        print(f"dropped: {dropped}")
    for skipped in summary["skipped_deletes"]:
        print(f"skipped: record {skipped['record']} at byte {skipped['offset']} deletes note {skipped['id']!r}, "
              "which the index did not hold")
    print(f"wrote {directory / summary['snapshot']} ({summary['notes']} notes) and pointed {CURRENT} at it; every "
          f"old file is kept in {summary['aside']}")


def run(args: argparse.Namespace, config: Any = None) -> dict[str, Any] | None:
    directory = Path(args.directory).absolute()
    if args.action == "check":
        check(directory)
        return None
    return recover(directory)
