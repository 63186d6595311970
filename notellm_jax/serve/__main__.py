"""`python -m notellm_jax.serve --config ... --export DIR --index DIR [--embeddings DIR] [--host --port]`.

Opens the live index in --index (or, when that folder holds none yet, builds it from the offline
embeddings in --embeddings, with titles and categories from <data_dir>/notes.parquet when present), loads
the export, compiles every length bucket, then serves on --host:--port (loopback by default).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import notellm_jax  # noqa: F401  (environment defaults before transformers is imported)

from notellm_jax.config import add_config_args, config_from_args
from notellm_jax.distributed import init_distributed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--export", help="NoteLLM export folder (default <work_dir>/export)")
    parser.add_argument("--index", required=True, help="live index folder (built from --embeddings if empty)")
    parser.add_argument("--embeddings", help="offline embeddings folder to build a new index from")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)


def open_index(config, index_dir: Path, emb_dir: str | None):
    from notellm_jax.serve.index import CURRENT, LiveIndex, index_from_embeddings

    if (index_dir / CURRENT).exists():
        return LiveIndex.open(index_dir, config.eval)
    if not emb_dir:
        raise FileNotFoundError(f"{index_dir} holds no live index yet: give --embeddings to build one")
    notes_file = config.data_dir / "notes.parquet"
    notes = []
    if notes_file.is_file():
        from notellm_jax.data.pipeline import read_notes
        notes = read_notes(notes_file)
    return index_from_embeddings(emb_dir, index_dir, config.eval, config.serve.max_k, notes)


def run(args: argparse.Namespace, config) -> None:
    import uvicorn

    from notellm_jax.embed import note_encoder
    from notellm_jax.serve.app import Service, create_app

    index = open_index(config, Path(args.index), args.embeddings)
    print(f"[serve] index {args.index}: {len(index)} notes (replayed {index.replayed} log records)", flush=True)
    encoder = note_encoder(config, args.export or config.work_dir / "export", batch_size=config.serve.max_batch_size)
    app = create_app(Service(encoder, index, config.serve))
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        index.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_args(parser)
    add_arguments(parser)
    args = parser.parse_args(argv)
    init_distributed()
    config = config_from_args(args)
    try:
        run(args, config)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        parser.exit(2, f"serve: error: {e}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
