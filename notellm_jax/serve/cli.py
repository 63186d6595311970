"""`notellm serve --config ... --export DIR --index DIR [--embeddings DIR] [--host --port]`
(= `python -m notellm_jax.serve ...`).

Opens the live index in --index (or, when that folder holds none yet, builds it from the offline
embeddings in --embeddings, with titles and categories from <data_dir>/notes.parquet when present), loads
the export, compiles every length bucket, then serves on --host:--port (loopback by default).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from notellm_jax.errors import MissingInputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--export", help="NoteLLM export folder (default <work_dir>/export)")
    parser.add_argument("--index", required=True, help="live index folder (built from --embeddings if empty)")
    parser.add_argument("--embeddings", help="offline embeddings folder to build a new index from")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)


def open_index(config, index_dir: Path, emb_dir: str | None):
    from notellm_jax.data import store
    from notellm_jax.serve.index import CURRENT, LiveIndex, index_from_embeddings

    if (index_dir / CURRENT).exists():
        return LiveIndex.open(index_dir, config.retrieval)
    if not emb_dir:
        raise MissingInputError(f"{index_dir} holds no live index yet: give --embeddings to build one")
    notes_file = config.data_dir / "notes.parquet"
    notes = store.load_notes(notes_file) if notes_file.is_file() else []
    return index_from_embeddings(emb_dir, index_dir, config.retrieval, config.serve.max_k, notes)


def run(args: argparse.Namespace, config) -> None:
    import uvicorn

    from notellm_jax.eval.embed import note_encoder
    from notellm_jax.serve.app import Service, create_app

    index = open_index(config, Path(args.index), args.embeddings)
    print(f"[serve] index {args.index}: {len(index)} notes (replayed {index.replayed} log records)", flush=True)
    encoder = note_encoder(config, args.export or config.work_dir / "export", batch_size=config.serve.max_batch_size)
    app = create_app(Service(encoder, index, config.serve))
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        index.close()
