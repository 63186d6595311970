"""`notellm embed --config C [--checkpoint EXPORT] [--split test|all] [--name N] [--out DIR]`: embed notes with
a trained NoteLLM export (the note encoder of `infer.encoder`) into the embeddings format (`infer.embeddings`).

The notes are those of the split in notes.parquet order (`store.notes_of`); one process writes them through
`write_embeddings`, several processes each their own blocks through `write_embeddings_across_hosts`.
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable
from pathlib import Path

import jax

from notellm_jax.config import Config
from notellm_jax.data import store
from notellm_jax.data.prompts import Note
from notellm_jax.data.shards import prompt_hash
from notellm_jax.infer.embeddings import (embedding_dir, write_embeddings, write_embeddings_across_hosts,
                                          written_summary)
from notellm_jax.infer.encoder import CHUNK_BATCHES, chunk_embedder, note_encoder


def embed_notes(config: Config, export, note_source: Iterable[Note], out_dir: str | Path, name: str = "notellm",
                mesh=None) -> Path:
    """Embed `note_source` with a NoteLLM export (a folder or a loaded `NoteLLMExport`) into `out_dir`
    (prompt, tokenizer, batching and prefix cache: `note_encoder`)."""
    encoder = note_encoder(config, export, mesh)
    export, prompt, batch_size = encoder.export, encoder.prompt, encoder.embedder.batch_size
    meta = {"model": name, "kind": "notellm", "source": encoder.source, "run": export.meta.get("run"),
            "objective": export.meta.get("objective"), "tokenizer": export.tokenizer,
            "prompt_hash": prompt_hash(dataclasses.replace(config, prompt=prompt), export.tokenizer),
            "prompt": dataclasses.asdict(prompt), "buckets": encoder.buckets, "batch_size": batch_size,
            "prefix_tokens": len(encoder.prefix), "devices": int(encoder.embedder.devices)}
    embed_chunk = chunk_embedder(encoder.embedder, encoder.tokens)
    if jax.process_count() > 1:
        out = write_embeddings_across_hosts(note_source, embed_chunk, out_dir, config.embed.shard_size, meta)
    else:
        out = write_embeddings(note_source, embed_chunk, out_dir, config.embed.shard_size,
                               batch_size * CHUNK_BATCHES, meta)
    if encoder.cache is not None and jax.process_index() == 0:
        encoder.cache.save()
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="NoteLLM export folder (default <work_dir>/export)")
    parser.add_argument("--split", choices=("test", "all"), default="test")
    parser.add_argument("--name", default="notellm", help="model name recorded in embeddings.json")
    parser.add_argument("--out", help="output folder (default <work_dir>/embeddings/<name>)")


def run(args, config: Config) -> Path:
    """`notellm embed`: embed the test (or all) notes with an export into the embeddings format."""
    out = Path(args.out) if args.out else embedding_dir(config, args.name)
    notes = store.notes_of(config.data_dir, args.split, order="file")
    path = embed_notes(config, args.checkpoint or config.work_dir / "export", notes, out, name=args.name)
    print(f"[embed] {written_summary(path)}")
    return path
