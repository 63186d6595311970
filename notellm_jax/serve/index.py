"""The service's live note index: ScaNN over unit vectors, updated in place, durable across kill -9.

Folder layout (no pickle anywhere; a folder holding one is refused):
    CURRENT          name of the live snapshot; replaced atomically (temp file, fsync, rename, fsync folder)
    snap-NNNNNN/     one snapshot: ScaNN assets (relative paths), ids.json (ScaNN position -> note id),
                     vectors.npy [n, d] float32 (exact search, rebuilds), notes.json (id -> title, category),
                     index.json (format, dim, count, ScaNN parameters)
    snap-NNNNNN.log  the upserts and deletes acknowledged since that snapshot, one record a line:
                     "<crc32 as 8 hex digits> <json>\\n"
A write is acknowledged only after its record is fsynced, and applied to memory after that. On open every
snapshot file is checked and the log replayed (index_files.py reads both): a final record whose checksum
verifies is kept even without its newline; an incomplete final record (a write cut by a crash, never
acknowledged, or a cut that looks like one) is the one damage repaired automatically, never quietly: it is
cut off into a side file `<log>.torn-<offset>` with a warning naming the file, offset and bytes, and listed
in `repairs` (the service's /healthz and /metrics report it). Any other damage (a record before the last that
does not verify, a missing log, a damaged snapshot file or CURRENT) refuses to open with one line naming the
file (and the record and byte offset); `notellm index check|recover DIR` list every problem and write a new
snapshot from what verifies. Replayed deletes of unknown ids are skipped with a warning and counted
(`skipped_deletes`); an upsert of a stored id replaces it. A new snapshot is complete on disk before CURRENT
names it, so a crash at any point leaves either the old snapshot with its log or the new one.

ScaNN 1.4.2 updates brute-force and tree-AH searchers in place (`upsert`/`delete` on integer positions of
the raw `ScannNumpy`; its docid wrapper would pickle the ids). A delete moves the last datapoint into the
freed slot; `ids` mirrors that. A tree trained on the first vectors drifts as notes arrive: `rebuild`
retrains on the current vectors and promotes the new tree only if its recall against exact search on a
sample of stored vectors reaches a threshold (else the old one stays).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from notellm_jax.config import RetrievalConfig
from notellm_jax.data.prompts import Note
from notellm_jax.errors import StoreFormatError
from notellm_jax.infer import ann
from notellm_jax.infer.ann import l2_normalise, neighbour_overlap
from notellm_jax.infer.embeddings import read_embeddings
from notellm_jax.serve.index_files import (CURRENT, FORMAT, LEFTOVER, LogRecord, LogScan, current_snapshot,
                                           fsync_path, holds_index, load_snapshot, read_log, record,
                                           set_aside_torn_tail, write_durable)

logger = logging.getLogger(__name__)


class UnknownNoteError(KeyError):
    """A note id that the index does not hold."""


def _refuse_non_finite(vectors: np.ndarray, ids: Sequence[str]) -> None:
    """A NaN/inf embedding (a broken model) must never enter the index: it would poison every search."""
    bad = ~np.isfinite(np.asarray(vectors, np.float32)).all(axis=-1)
    if bad.any():
        names = [str(ids[i]) for i in np.flatnonzero(bad)[:5]]
        raise ValueError(f"{int(bad.sum())} non-finite vector(s) refused, nothing indexed (notes {names})")


@dataclasses.dataclass
class Hit:
    note_id: str
    score: float
    title: str
    category: str


class LiveIndex:
    """Thread-safe: one lock orders writes, searches and snapshots (ScaNN is not documented as safe
    for a search during an update)."""

    def __init__(self, directory: Path, raw, params: ann.ScannParams, ids: list[str], vectors: np.ndarray,
                 notes: dict[str, dict[str, str]], snapshot: str, cfg: RetrievalConfig):
        """In memory only: the log is opened by `open` (after replay) or by the first `snapshot`."""
        self.directory, self._raw, self.params, self._cfg = directory, raw, params, cfg
        self._ids, self._pos = list(ids), {note_id: i for i, note_id in enumerate(ids)}
        if len(self._pos) != len(ids):
            raise StoreFormatError(f"{directory}/{snapshot}: ids.json holds duplicate ids")
        self._vectors = np.array(vectors, np.float32)  # grows by doubling; rows [0, n) are live
        self._notes, self._snapshot = dict(notes), snapshot
        self._lock = threading.RLock()
        self._log = None
        self.replayed = 0  # log records applied on open
        self.repairs: list[dict[str, Any]] = []  # torn log tails cut off on open (`index_files.set_aside_torn_tail`)
        self.skipped_deletes: list[dict[str, Any]] = []  # replayed deletes of ids the index did not hold

    # ----------------------------------------------------------------------------------------------
    # Creating and opening

    @classmethod
    def create(cls, directory: str | os.PathLike, ids: Sequence[str], vectors: np.ndarray,
               notes: dict[str, dict[str, str]], cfg: RetrievalConfig, k: int) -> LiveIndex:
        """A new index folder over (ids, vectors); refuses a folder that already holds an index."""
        directory = Path(directory).absolute()
        if holds_index(directory):
            raise FileExistsError(f"{directory} already holds an index (CURRENT or snapshot files); open it instead")
        _refuse_non_finite(vectors, ids)
        directory.mkdir(parents=True, exist_ok=True)
        vectors = l2_normalise(vectors) if len(vectors) else np.zeros((0, vectors.shape[1]), np.float32)
        params = ann.choose_params(max(len(ids), 1), max(1, min(k, len(ids))), cfg)
        raw = ann.build_index(vectors, max(1, k), params).searcher
        index = cls(directory, raw, params, list(ids), vectors, notes, "snap-000000", cfg)
        index.snapshot()
        return index

    @classmethod
    def open(cls, directory: str | os.PathLike, cfg: RetrievalConfig) -> LiveIndex:
        """Load the snapshot CURRENT names, every file checked, replay its log (a torn final record cut off into a
        side file, with a warning), clear leftovers. Any other damage: a one-line `StoreFormatError` or
        `MissingInputError` naming the file (and record and byte offset)."""
        directory = Path(directory).absolute()
        ann.refuse_pickles(directory)
        name, problems = current_snapshot(directory)
        if not problems:
            snap, problems = load_snapshot(directory, name)
        if problems:
            raise problems[0].error(directory, len(problems) - 1)
        index = cls(directory, snap.raw, snap.params, snap.ids, snap.vectors, snap.notes, name, cfg)
        log_path = directory / f"{name}.log"
        index.replay(read_log(log_path, index.dim))
        index._log = open(log_path, "ab")
        index._remove_leftovers()
        return index

    def replay(self, scan: LogScan) -> None:
        """Apply the log's records in memory; a torn tail is cut off the file (into a side file), a final newline
        that a cut removed is restored, so the next record starts on its own line."""
        if scan.torn is not None:
            self.repairs.append(set_aside_torn_tail(scan))
        elif scan.missing_newline:
            with open(scan.path, "ab") as f:
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
            logger.info("%s: its final record verifies but had no newline: kept, newline restored", scan.path)
        for entry in scan.records:
            self.replay_record(entry)
        self.replayed = len(scan.records)

    def replay_record(self, entry: LogRecord) -> None:
        """One logged operation, by rule: a delete of an id the index does not hold is skipped, with a warning,
        and counted; an upsert of a stored id replaces it."""
        op = entry.op
        if op["op"] == "delete" and op["id"] not in self._pos:
            logger.warning("%s.log: record %d at byte %d deletes note %r, which the index does not hold: skipped",
                           self.directory / self._snapshot, entry.number, entry.offset, op["id"])
            self.skipped_deletes.append({"id": op["id"], "record": entry.number, "offset": entry.offset})
            return
        self._apply(op)

    def close(self) -> None:
        with self._lock:
            if self._log is not None:
                self._log.close()
                self._log = None

    # ----------------------------------------------------------------------------------------------
    # Writes: logged and fsynced, then applied

    def upsert(self, note_id: str, vector: np.ndarray, title: str = "", category: str = "") -> None:
        """Index (or replace) one note, durable before this returns; a non-finite vector is refused unwritten."""
        _refuse_non_finite(np.asarray(vector, np.float32).reshape(1, -1), [note_id])
        vector = l2_normalise(np.asarray(vector, np.float32).reshape(1, -1))[0]
        if vector.shape[0] != self.dim:
            raise ValueError(f"vector of dim {vector.shape[0]}, the index holds dim {self.dim}")
        op = {"op": "upsert", "id": str(note_id), "vector": [float(x) for x in vector], "title": title,
              "category": category}
        with self._lock:
            self._append(op)
            self._apply(op)

    def delete(self, note_id: str) -> None:
        with self._lock:
            if note_id not in self._pos:
                raise UnknownNoteError(note_id)
            op = {"op": "delete", "id": note_id}
            self._append(op)
            self._apply(op)

    def _append(self, op: dict[str, Any]) -> None:
        self._log.write(record(op))
        self._log.flush()
        os.fsync(self._log.fileno())

    def _apply(self, op: dict[str, Any]) -> None:
        note_id = op["id"]
        if op["op"] == "delete":
            pos, last = self._pos.pop(note_id), len(self._ids) - 1
            self._raw.delete([pos])
            if pos != last:  # ScaNN moved its last point into the freed slot
                moved = self._ids[last]
                self._ids[pos], self._pos[moved] = moved, pos
                self._vectors[pos] = self._vectors[last]
            self._ids.pop()
            self._notes.pop(note_id, None)
            return
        vector = np.asarray(op["vector"], np.float32)
        pos = self._pos.get(note_id)
        self._raw.upsert([pos], vector[None], 1)
        if pos is None:
            pos = len(self._ids)
            self._ids.append(note_id)
            self._pos[note_id] = pos
            if pos == len(self._vectors):
                grown = np.zeros((max(16, 2 * len(self._vectors)), self.dim), np.float32)
                grown[:pos] = self._vectors[:pos]
                self._vectors = grown
        self._vectors[pos] = vector
        self._notes[note_id] = {"title": op.get("title", ""), "category": op.get("category", "")}

    # ----------------------------------------------------------------------------------------------
    # Reads

    @property
    def dim(self) -> int:
        return self._vectors.shape[1]

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, note_id: str) -> bool:
        return note_id in self._pos

    def vector(self, note_id: str) -> np.ndarray:
        with self._lock:
            if note_id not in self._pos:
                raise UnknownNoteError(note_id)
            return self._vectors[self._pos[note_id]].copy()

    def note(self, note_id: str) -> dict[str, str]:
        return self._notes.get(note_id, {"title": "", "category": ""})

    def search(self, queries: np.ndarray, k: int, exclude: Sequence[str | None] | None = None) -> list[list[Hit]]:
        """The k nearest stored notes of each unit query, best first; exclude[i] is left out of row i."""
        queries = l2_normalise(np.asarray(queries, np.float32).reshape(-1, self.dim))
        exclude = list(exclude) if exclude is not None else [None] * len(queries)
        with self._lock:
            fetch = min(k + 1, len(self._ids))
            if fetch == 0:
                return [[] for _ in queries]
            pre = max(fetch, self.params.reorder) if not self.params.brute_force else -1
            positions, scores = self._raw.search_batched(queries, fetch, pre, -1, False, 0)
            out = []
            for row, skip in zip(range(len(queries)), exclude):
                # A tree whose searched leaves hold fewer than `fetch` points pads the row with NaN scores.
                hits = [Hit(self._ids[p], float(s), **self.note(self._ids[p]))
                        for p, s in zip(positions[row], scores[row]) if np.isfinite(s) and self._ids[p] != skip]
                out.append(hits[:k])
            return out

    def exact_search(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Positions of the exact top k by dot product (numpy), for recall checks."""
        with self._lock:
            scores = np.asarray(queries, np.float32) @ self._vectors[:len(self._ids)].T
        return np.argsort(-scores, axis=1, kind="stable")[:, :k]

    def recall_vs_exact(self, k: int, sample: int, seed: int = 0) -> float:
        """Share of the exact top k (of `sample` stored vectors as queries) that the live ScaNN returns."""
        with self._lock:
            return self._recall(self._raw, self.params, k, sample, seed)

    def _recall(self, raw, params: ann.ScannParams, k: int, sample: int, seed: int) -> float:
        n = len(self._ids)
        if n == 0:
            return 1.0
        k = min(k, n)
        rows = np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False)
        queries = self._vectors[rows]
        pre = -1 if params.brute_force else max(k, params.reorder)
        approx, scores = raw.search_batched(queries, k, pre, -1, False, 0)
        approx = np.where(np.isfinite(scores), approx, -1)  # padding (see `search`) finds nothing
        return neighbour_overlap(approx.astype(np.int64), self.exact_search(queries, k))

    # ----------------------------------------------------------------------------------------------
    # Snapshots and rebuilds

    def snapshot(self, number: int | None = None) -> str:
        """Write the whole index as a new snapshot with an empty log, then point CURRENT at it. `number`: the new
        snapshot's (default the live one's + 1; `notellm index recover` passes one above every folder present)."""
        with self._lock:
            number = int(self._snapshot.split("-")[1]) + 1 if number is None else number
            name = f"snap-{number:06d}"
            tmp = self.directory / f"{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            n = len(self._ids)
            self._raw.serialize(str(tmp), True)
            np.save(tmp / "vectors.npy", self._vectors[:n])
            meta = {"format": FORMAT, "dim": self.dim, "count": n, "params": dataclasses.asdict(self.params)}
            for file, value in (("ids.json", self._ids), ("notes.json", self._notes), ("index.json", meta)):
                (tmp / file).write_text(json.dumps(value))
            for file in tmp.iterdir():
                fsync_path(file)
            fsync_path(tmp)
            tmp.rename(self.directory / name)
            write_durable(self.directory / f"{name}.log", b"")
            write_durable(self.directory / f"{CURRENT}.tmp", name.encode())
            fsync_path(self.directory)
            os.replace(self.directory / f"{CURRENT}.tmp", self.directory / CURRENT)
            fsync_path(self.directory)
            if self._log is not None:
                self._log.close()
            self._snapshot = name
            self._log = open(self.directory / f"{name}.log", "ab")
            self._remove_leftovers()
            return name

    def _remove_leftovers(self) -> None:
        """Older snapshots and logs, and a snapshot or CURRENT half-written by a crash (never side files of
        repairs, nor what `notellm index recover` kept aside)."""
        for path in self.directory.iterdir():
            if LEFTOVER.fullmatch(path.name) and path.name not in (self._snapshot, f"{self._snapshot}.log"):
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    def rebuild(self, k: int, min_recall: float, sample: int, params: ann.ScannParams | None = None,
                seed: int = 0) -> dict[str, Any]:
        """Retrain ScaNN on the current vectors; promote (and snapshot) only if its recall@k against exact
        search on `sample` stored vectors reaches `min_recall`. Writes wait meanwhile (one lock). The report
        also gives the live index's recall on the same queries (`live_recall`: what the upserts left)."""
        with self._lock:
            n = len(self._ids)
            k = min(k, n)
            params = params or ann.choose_params(n, k, self._cfg)
            candidate = ann.build_index(self._vectors[:n], k, params).searcher
            recall = self._recall(candidate, params, k, sample, seed)
            report = {"size": n, "k": k, "recall": recall, "live_recall": self._recall(self._raw, self.params, k,
                                                                                      sample, seed),
                      "min_recall": min_recall, "params": dataclasses.asdict(params), "promoted": recall >= min_recall}
            if report["promoted"]:
                self._raw, self.params = candidate, params
                report["snapshot"] = self.snapshot()
            return report


def index_from_embeddings(emb_dir: str | os.PathLike, out_dir: str | os.PathLike, cfg: RetrievalConfig, k: int,
                          notes: Sequence[Note] = ()) -> LiveIndex:
    """A new live index over an embeddings folder (`notellm embed`, `notellm_jax.infer.embeddings`); titles and categories from `notes`."""
    ids, vectors = read_embeddings(emb_dir)
    info = {n.note_id: {"title": n.title, "category": n.category} for n in notes}
    return LiveIndex.create(out_dir, ids, vectors, {i: info[i] for i in ids if i in info}, cfg, k)
