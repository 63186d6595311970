"""The embeddings file format: streamed shards of unit vectors with their note ids.

A folder (at most one shard is held in memory, writing or reading):
    embeddings-XXXXX.npy   float32 [n, d] unit vectors
    ids-XXXXX.txt          the n note ids of that shard, one per line
    embeddings.json        format, model name, dim, count, shards, prompt hash, skipped notes, timing
NoteLLM (`infer.embed`) and every baseline (`eval.baselines`) write it through `write_embeddings` (one
process, `EmbeddingWriter`) or `write_embeddings_across_hosts` (every process its own blocks), which stream
notes through a `ChunkEmbedder`.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from notellm_jax.config import Config
from notellm_jax.data.prompts import Note
from notellm_jax.errors import MissingInputError

FORMAT = "notellm_jax.embeddings/1"
META_FILE = "embeddings.json"

# A chunk of notes -> (ids of the embedded notes, their vectors [n, d], skipped notes by reason): what the
# writers below stream (`infer.encoder.chunk_embedder` builds one from a batch embedder).
ChunkEmbedder = Callable[[list[Note]], tuple[list[str], np.ndarray, Counter]]


# --------------------------------------------------------------------------------------------------
# Streaming storage


def clear_folder(out_dir: str | Path) -> Path:
    """`out_dir` created and emptied of an earlier run's shards (a shorter rerun must not leave old ones)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob("embeddings-*.npy"), *out_dir.glob("ids-*.txt"), *out_dir.glob("part-*.json"),
                  out_dir / META_FILE]:
        stale.unlink(missing_ok=True)
    return out_dir


def write_shard(out_dir: Path, index: int, ids: Sequence[str], vectors: np.ndarray) -> dict[str, Any]:
    """Shard `index` (its two files) and its embeddings.json entry."""
    emb_name, ids_name = f"embeddings-{index:05d}.npy", f"ids-{index:05d}.txt"
    np.save(out_dir / emb_name, np.asarray(vectors, np.float32))
    (out_dir / ids_name).write_text("".join(i + "\n" for i in ids))
    return {"embeddings": emb_name, "ids": ids_name, "count": len(ids)}


def write_meta(out_dir: Path, meta: dict[str, Any], dim: int | None, shards: list[dict[str, Any]]) -> Path:
    """embeddings.json, written last: its presence means the folder is complete."""
    info = {**meta, "format": FORMAT, "dim": dim, "count": sum(s["count"] for s in shards), "shards": shards}
    (out_dir / META_FILE).write_text(json.dumps(info, indent=2))
    return out_dir


def nonfinite_ids(ids: Sequence[str], vectors: np.ndarray) -> list[str]:
    """The ids whose embedding holds a NaN or inf (such a folder is never written)."""
    return [i for i, row in zip(ids, vectors) if not np.isfinite(row).all()]


class EmbeddingWriter:
    """Appends (ids, vectors) and writes a shard each time `shard_size` rows are buffered."""

    def __init__(self, out_dir: str | Path, shard_size: int):
        if shard_size < 1:
            raise ValueError(f"embed.shard_size must be >= 1, got {shard_size}")
        self.out_dir = clear_folder(out_dir)
        self.shard_size = shard_size
        self.dim: int | None = None
        self.count = 0
        self.shards: list[dict[str, Any]] = []
        self._ids: list[str] = []
        self._vectors: list[np.ndarray] = []

    def add(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim != 2 or len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for embeddings of shape {vectors.shape}")
        if self.dim is None:
            self.dim = vectors.shape[1]
        if vectors.shape[1] != self.dim:
            raise ValueError(f"embedding dim changed from {self.dim} to {vectors.shape[1]}")
        bad = [i for i in ids if "\n" in i or "\r" in i]
        if bad:
            raise ValueError(f"note ids with line breaks cannot be stored one per line: {bad[:5]!r}")
        nonfinite = nonfinite_ids(ids, vectors)
        if nonfinite:
            raise ValueError(f"{len(nonfinite)} of {len(ids)} embeddings are not finite (notes {nonfinite[:5]}): "
                             f"the model produced NaN/inf; nothing is written to {self.out_dir}")
        self._ids.extend(ids)
        self._vectors.append(vectors)
        while len(self._ids) >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, rows: int) -> None:
        matrix = np.concatenate(self._vectors) if len(self._vectors) > 1 else self._vectors[0]
        self.shards.append(write_shard(self.out_dir, len(self.shards), self._ids[:rows], matrix[:rows]))
        self.count += rows
        self._ids, self._vectors = self._ids[rows:], [matrix[rows:]]

    def abort(self) -> None:
        """Remove the shards written so far (a failed run leaves no partial folder behind)."""
        for shard in self.shards:
            for name in (shard["embeddings"], shard["ids"]):
                (self.out_dir / name).unlink(missing_ok=True)
        self.shards, self._ids, self._vectors = [], [], []

    def close(self, meta: dict[str, Any]) -> Path:
        """Write what is left and embeddings.json (written last: its presence means the folder is complete)."""
        if self._ids:
            self._flush(len(self._ids))
        return write_meta(self.out_dir, meta, self.dim, self.shards)


def embedding_dir(config: Config, model: str) -> Path:
    """Where the tools and the main job keep one model's embeddings: <work_dir>/embeddings/<model>."""
    return config.work_dir / "embeddings" / model


def written_summary(emb_dir: str | Path) -> str:
    """One line for the CLIs: what an embeddings folder holds."""
    meta = read_embeddings_meta(emb_dir)
    return (f"wrote {meta['count']} x {meta['dim']} {meta['model']} embeddings to {emb_dir} "
            f"({meta['notes_per_s']} notes/s, skipped {meta['skipped'] or 'none'})")


def read_embeddings_meta(emb_dir: str | Path) -> dict[str, Any]:
    path = Path(emb_dir) / META_FILE
    if not path.is_file():
        raise MissingInputError(f"{emb_dir} holds no embeddings ({META_FILE} missing: run notellm embed "
                                "or notellm baselines, or the run was interrupted)")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def iter_shards(emb_dir: str | Path) -> Iterator[tuple[list[str], np.ndarray]]:
    """(ids, memory-mapped vectors) of each shard in order, checked against embeddings.json."""
    emb_dir = Path(emb_dir)
    for shard in read_embeddings_meta(emb_dir)["shards"]:
        ids = (emb_dir / shard["ids"]).read_text().splitlines()
        vectors = np.load(emb_dir / shard["embeddings"], mmap_mode="r")
        if not len(ids) == len(vectors) == shard["count"]:
            raise ValueError(f"{emb_dir}: shard {shard['embeddings']} has {len(vectors)} rows and {shard['ids']} "
                             f"{len(ids)} ids, embeddings.json says {shard['count']}")
        yield ids, vectors


def read_embeddings(emb_dir: str | Path, ids: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
    """All (ids, vectors) in file order, or with `ids` only those rows, in the order of `ids`.

    Selecting keeps one memory-mapped shard plus the selected rows in memory. An id that is missing, or
    stored twice, is an error naming the folder and the ids.
    """
    meta = read_embeddings_meta(emb_dir)
    if ids is None:
        parts = list(iter_shards(emb_dir))
        all_ids = [i for shard_ids, _ in parts for i in shard_ids]
        vectors = np.concatenate([np.asarray(v) for _, v in parts]) if parts else np.zeros((0, meta["dim"] or 0))
        return all_ids, vectors.astype(np.float32)
    wanted = {note_id: pos for pos, note_id in enumerate(ids)}
    if len(wanted) != len(ids):
        raise ValueError("the requested ids contain duplicates")
    out = np.zeros((len(ids), meta["dim"] or 0), np.float32)
    hits = np.zeros(len(ids), np.int64)
    for shard_ids, vectors in iter_shards(emb_dir):
        positions = np.array([wanted.get(i, -1) for i in shard_ids], np.int64)
        found = positions >= 0
        out[positions[found]] = vectors[found]
        np.add.at(hits, positions[found], 1)
    missing = [ids[p] for p in np.flatnonzero(hits == 0)]
    if missing:
        raise ValueError(f"{emb_dir}: {len(missing)} of {len(ids)} requested notes have no embedding "
                         f"(e.g. {missing[:5]!r}); were these embeddings made from another data set or split?")
    twice = [ids[p] for p in np.flatnonzero(hits > 1)]
    if twice:
        raise ValueError(f"{emb_dir}: {len(twice)} notes are stored more than once (e.g. {twice[:5]!r})")
    return list(ids), out


# --------------------------------------------------------------------------------------------------
# Writers: notes streamed through a ChunkEmbedder


def _chunks(items: Iterable[Note], size: int) -> Iterator[list[Note]]:
    chunk: list[Note] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_embeddings(notes: Iterable[Note], embed_chunk: ChunkEmbedder, out_dir: str | Path, shard_size: int,
                     chunk_size: int, meta: dict[str, Any]) -> Path:
    """Stream `notes` through `embed_chunk` into an embeddings folder, printing notes/s per chunk."""
    writer = EmbeddingWriter(out_dir, shard_size)
    skipped: Counter = Counter()
    start, done = time.time(), 0
    try:
        for chunk in _chunks(notes, chunk_size):
            ids, vectors, chunk_skipped = embed_chunk(chunk)
            if ids:
                writer.add(ids, vectors)
            skipped.update(chunk_skipped)
            done += len(chunk)
            elapsed = time.time() - start
            print(f"[embed] {meta.get('model', '?')}: {done} notes, {done / elapsed:.1f} notes/s", flush=True)
    except BaseException:
        writer.abort()  # e.g. non-finite vectors: no partial folder is left behind
        raise
    elapsed = time.time() - start
    if writer.dim is None:
        raise ValueError(f"no note could be embedded ({done} read, skipped: {dict(skipped) or 'none'})")
    return writer.close({**meta, "notes_read": done, "skipped": dict(skipped), "seconds": round(elapsed, 3),
                         "notes_per_s": round(done / max(elapsed, 1e-9), 2)})


def write_embeddings_across_hosts(notes: Iterable[Note], embed_chunk: ChunkEmbedder, out_dir: str | Path,
                                  shard_size: int, meta: dict[str, Any]) -> Path:
    """Every process calls this with the same notes. They form blocks of `shard_size`; process p embeds
    blocks p, p + P, ... and writes each as the shard of that number (with no skipped note, the very files
    one process writes), then process 0 writes embeddings.json from every process's part-*.json. Non-finite
    embeddings fail every process alike (each reads all parts) and leave no shard behind."""
    processes, me = jax.process_count(), jax.process_index()
    out_dir = Path(out_dir)
    if me == 0:
        clear_folder(out_dir)
    multihost_utils.sync_global_devices("embed: folder cleared")
    notes, start = list(notes), time.time()
    _embed_own_blocks(notes, embed_chunk, out_dir, shard_size, processes, me)
    multihost_utils.sync_global_devices("embed: shards written")
    parts = [json.loads(p.read_text()) for p in sorted(out_dir.glob("part-*.json"))]
    shards = sorted((s for part in parts for s in part["shards"]), key=lambda s: s["block"])
    skipped = sum((Counter(part["skipped"]) for part in parts), Counter())
    nonfinite = [i for part in parts for i in part["nonfinite"]]
    multihost_utils.sync_global_devices("embed: parts read")
    if me == 0:
        stale = [*out_dir.glob("part-*.json"),
                 *(out_dir / s[k] for s in shards if nonfinite for k in ("embeddings", "ids"))]
        for path in stale:
            path.unlink(missing_ok=True)
    if nonfinite:
        raise ValueError(f"{len(nonfinite)} embeddings are not finite (notes {nonfinite[:5]}): the model produced "
                         f"NaN/inf; nothing is written to {out_dir}")
    if not shards:
        raise ValueError(f"no note could be embedded ({len(notes)} read, skipped: {dict(skipped) or 'none'})")
    if me == 0:
        elapsed = time.time() - start
        write_meta(out_dir, {**meta, "notes_read": len(notes), "skipped": dict(skipped), "processes": processes,
                             "seconds": round(elapsed, 3), "notes_per_s": round(len(notes) / max(elapsed, 1e-9), 2)},
                   shards[0]["dim"], [{k: s[k] for k in ("embeddings", "ids", "count")} for s in shards])
    multihost_utils.sync_global_devices("embed: embeddings.json written")
    return out_dir


def _embed_own_blocks(notes: list[Note], embed_chunk: ChunkEmbedder, out_dir: Path, shard_size: int,
                      processes: int, me: int) -> None:
    """Process `me`'s blocks embedded and written as shards; what it did goes to its part-<me>.json."""
    shards, skipped, nonfinite = [], Counter(), []
    for block in range(me, -(-len(notes) // shard_size), processes):
        ids, vectors, block_skipped = embed_chunk(notes[block * shard_size:(block + 1) * shard_size])
        skipped.update(block_skipped)
        bad = nonfinite_ids(ids, vectors) if ids else []
        nonfinite += bad
        if ids and not bad:
            shards.append({**write_shard(out_dir, block, ids, vectors), "block": block, "dim": vectors.shape[1]})
    part = {"shards": shards, "skipped": skipped, "nonfinite": nonfinite}
    (out_dir / f"part-{me:05d}.json").write_text(json.dumps(part))
    print(f"[embed] process {me}/{processes}: wrote shards {[s['block'] for s in shards]}", flush=True)
