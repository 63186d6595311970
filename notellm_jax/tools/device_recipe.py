"""The accelerator recipe as one prepared command: train on a host without TensorFlow or gguf, return the
test-note embeddings, score them here with the recall harness.

Here (after `notellm prepare --config configs/smollm2_se.py:full`):
    notellm device pack --config configs/smollm2_se.py:full --bundle device_bundle
writes device_bundle/data (shards/meta.json, shards/tokens.npz, split.json: the tokenised pairs and notes,
numpy-readable) and device_bundle/weights (the GGUF's raw blocks in parts of at most 60 MiB + manifest;
`weights/packed.py`). Copy the parts over in as many transfers as the link needs, then there:
    notellm device run --config configs/smollm2_se.py:full --bundle device_bundle \
        --out OUT
which dequantises the weights with numpy, trains with `data.train_input=numpy`, embeds the test notes
from tokens.npz (the category prompt up to [EMB], as `embed.py` builds it) and writes OUT/embeddings/notellm
plus OUT/summary.json (wall times, last metrics). Back here:
    notellm recall --config configs/smollm2_se.py:full --embeddings OUT/embeddings/notellm
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from collections import Counter
from pathlib import Path

import jax
import numpy as np

from notellm_jax import sharding as shd
from notellm_jax.config import Config, override
from notellm_jax.data import store
from notellm_jax.data.shards import read_shards_meta
from notellm_jax.data.prompts import Note
from notellm_jax.errors import MissingInputError
from notellm_jax.infer.embeddings import write_embeddings
from notellm_jax.infer.encoder import CHUNK_BATCHES, chunk_embedder, notellm_batch_embedder
from notellm_jax.train import train
from notellm_jax.weights.export import load_notellm
from notellm_jax.weights.packed import pack_gguf, packed_to_hf

BUNDLE_DATA = ("shards/meta.json", "shards/tokens.npz", "split.json")


def pack(config: Config, bundle: Path) -> dict:
    """Copy the numpy-readable prepared data and pack the weights (a GGUF) into `bundle`."""
    # train.batch_by_category reads the notes' categories, train.self_positive_weight their fields
    notes = config.train.batch_by_category or config.train.self_positive_weight > 0
    for name in BUNDLE_DATA + (("notes.parquet",) if notes else ()):
        source = config.data_dir / name
        if not source.is_file():
            raise MissingInputError(f"{source} not found: run `notellm prepare` for this config first")
        (bundle / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, bundle / "data" / name)
    checkpoint = config.resolve(config.model.checkpoint)
    if checkpoint.suffix == ".gguf":
        pack_gguf(checkpoint, bundle / "weights")
    sizes = {str(p.relative_to(bundle)): p.stat().st_size for p in sorted(bundle.rglob("*")) if p.is_file()}
    return {"bundle": str(bundle), "files": sizes, "packed_weights": checkpoint.suffix == ".gguf"}


def device_config(config: Config, bundle: Path, work_dir: Path) -> Config:
    """The run's config on the device: the bundle's data (numpy input) and weights (HF folder made there)."""
    updates = {"paths.data_dir": str(bundle / "data"), "paths.work_dir": str(work_dir), "data.train_input": "numpy"}
    if (bundle / "weights" / "manifest.json").is_file():
        hf = bundle / "hf"
        if not (hf / "config.json").is_file():
            packed_to_hf(bundle / "weights", hf)
        updates["model.checkpoint"] = str(hf.absolute())
    return override(config, updates)


def test_note_tokens(data_dir: Path) -> tuple[list[str], list[list[int]], Counter]:
    """(ids, category prompts up to [EMB]) of the test notes, from tokens.npz; notes without one are counted."""
    with np.load(data_dir / "shards" / "tokens.npz") as data:
        note_ids, offsets = data["note_id"], data["cat_offsets"]
        ids, emb = data["cat_ids"], data["cat_emb"]
    index_of = {str(n): i for i, n in enumerate(note_ids)}
    kept, tokens, skipped = [], [], Counter()
    for note in store.split_note_ids(data_dir, "test"):
        i = index_of.get(note)
        if i is None or emb[i] < 0:
            skipped["not_encodable" if i is not None else "unknown_note"] += 1
            continue
        kept.append(note)
        tokens.append(ids[offsets[i]:offsets[i] + emb[i] + 1].tolist())
    return kept, tokens, skipped


def embed_test_notes(config: Config, export_dir: Path, out_dir: Path) -> Path:
    export = load_notellm(export_dir)
    meta = read_shards_meta(config, config.data_dir)
    mesh = shd.mesh_from_config(config.mesh)
    embedder, _ = notellm_batch_embedder(export, mesh, config.embed.batch_size, export.prompt.max_length,
                                         config.embed.length_buckets, meta["pad_id"], config.prompt.padding_side,
                                         str(export_dir))
    ids, tokens, skipped = test_note_tokens(config.data_dir)
    by_id = dict(zip(ids, tokens))
    notes = [Note(note_id=i, title="", content="", topics=[], category="") for i in ids]
    info = {"model": "notellm", "kind": "notellm", "source": str(export_dir), "run": export.meta.get("run"),
            "objective": export.meta.get("objective"), "prompt_hash": meta["prompt_hash"],
            "input": "shards/tokens.npz", "skipped_before_embedding": dict(skipped)}
    return write_embeddings(notes, chunk_embedder(embedder, lambda note: by_id[note.note_id]), out_dir,
                            config.embed.shard_size, config.embed.batch_size * CHUNK_BATCHES, info)


def run_recipe(config: Config, bundle: Path, out: Path) -> dict:
    """Train + embed on this host; returns (and writes to out/summary.json) the wall times and metrics."""
    start = time.time()
    config = device_config(config, bundle.absolute(), bundle.absolute() / "run")
    weights_s = time.time() - start
    metrics = train(config)
    train_s = time.time() - start - weights_s
    emb_dir = embed_test_notes(config, config.work_dir / "export", out / "embeddings" / "notellm")
    summary = {"config": config.name, "device": str(jax.devices()[0].device_kind), "devices": jax.device_count(),
               "seconds": {"weights": round(weights_s, 1), "train": round(train_s, 1),
                           "embed": round(time.time() - start - weights_s - train_s, 1),
                           "total": round(time.time() - start, 1)},
               "last_metrics": metrics, "embeddings": str(emb_dir)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("pack", "run"))
    parser.add_argument("--bundle", required=True, help="the folder that travels to the device")
    parser.add_argument("--out", help="run: where embeddings/ and summary.json go")


def run(args, config: Config) -> dict:
    """`notellm device pack|run`."""
    if args.action == "pack":
        result = pack(config, Path(args.bundle))
    elif args.out is None:
        raise MissingInputError("notellm device run needs --out (where the embeddings and summary go)")
    else:
        result = run_recipe(config, Path(args.bundle), Path(args.out))
    print(json.dumps(result, indent=2, default=str))
    return result
