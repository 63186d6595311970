"""`notellm serve --config ... --export DIR --index DIR [--embeddings DIR] [--generate [--constrain-categories]]
[--host --port] [--api-key-file F] [--allowed-hosts H,...] [--docs]` (= `python -m notellm_jax.serve ...`).

Binds --host:--port first (loopback by default; a port in use fails at once), answering /healthz (alive) and
/readyz (503, what is loading) while it opens the live index in --index (or, when that folder holds none yet,
builds it from the offline embeddings in --embeddings, with titles and categories from <data_dir>/notes.parquet
when present), loads the export and compiles every length bucket, through JAX's persistent compilation cache
(`serve.compilation_cache_dir`, default <paths.cache_dir>/jax_compilation: a restart loads compiled programs),
then serves (`serve.startup`). With
--generate the same export also generates each note's category and hashtags (POST /generate), with the
`generation` settings of the config; the category is constrained to the training notes' categories
(<data_dir>/split.json) with --constrain-categories or generation.constrain_categories, as in `notellm generate`.
Keys, allowed hosts and the warning for a non-loopback address without keys: `serve.access`.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import uvicorn

from notellm_jax.data import store
from notellm_jax.errors import MissingInputError
from notellm_jax.runtime import enable_compilation_cache
from notellm_jax.infer.encoder import note_encoder
from notellm_jax.infer.generator import closed_categories
from notellm_jax.serve.access import KEYS_ENV, Access, warn_if_exposed
from notellm_jax.serve.app import Service, create_app
from notellm_jax.serve.batching import row_buckets
from notellm_jax.serve.generation import NoteGenerator
from notellm_jax.serve.index import LiveIndex, index_from_embeddings
from notellm_jax.serve.index_files import holds_index
from notellm_jax.serve.startup import Starting, bind


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--export", help="NoteLLM export folder (default <work_dir>/export as `notellm train` "
                        "writes it, else <work_dir>/models/notellm/export as `notellm job` does)")
    parser.add_argument("--index", required=True, help="live index folder (built from --embeddings if empty)")
    parser.add_argument("--embeddings", help="offline embeddings folder to build a new index from")
    parser.add_argument("--generate", action="store_true", help="also serve generated categories and hashtags")
    parser.add_argument("--constrain-categories", action="store_true", default=None,
                        help="constrain generated categories to the training ones (default generation.constrain_categories)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--api-key-file", help=f"keys file, lines `read <key>` / `admin <key>` (default ${KEYS_ENV}); "
                        "with keys every route but /healthz needs a Bearer key, writes an admin one")
    parser.add_argument("--allowed-hosts", type=lambda s: s.split(","),
                        help="comma-separated Host header names served (default: --host, localhost, 127.0.0.1, "
                        "::1; `*` = any)")
    parser.add_argument("--docs", action="store_true", help="serve Swagger /docs and /openapi.json (off by default)")


def open_index(config, index_dir: Path, emb_dir: str | None):
    if holds_index(index_dir):  # whole or damaged: opening refuses a damaged one, never builds over it
        return LiveIndex.open(index_dir, config.retrieval)
    if not emb_dir:
        raise MissingInputError(f"{index_dir} holds no live index yet: give --embeddings to build one")
    notes_file = config.data_dir / "notes.parquet"
    notes = store.load_notes(notes_file) if notes_file.is_file() else []
    return index_from_embeddings(emb_dir, index_dir, config.retrieval, config.serve.max_k, notes)


def open_generator(args: argparse.Namespace, config, export):
    """The service's `NoteGenerator` with --generate, else None."""
    if not args.generate:
        return None

    constrain = config.generation.constrain_categories if args.constrain_categories is None else True
    if constrain and not (config.data_dir / "split.json").is_file():
        raise MissingInputError(f"constrained categories need the training notes' categories, from "
                                f"{config.data_dir / 'split.json'}: run prepare, or serve without constraint")
    return NoteGenerator(config, export, closed_categories(config) if constrain else None)


def default_export(config) -> Path:
    """Where the export is when --export is not given: `notellm train`'s <work_dir>/export, else the main job's
    <work_dir>/models/notellm/export; neither: a MissingInputError naming both."""
    candidates = (config.work_dir / "export", config.work_dir / "models" / "notellm" / "export")
    for folder in candidates:
        if (folder / "notellm.json").is_file():
            return folder
    raise MissingInputError(f"no NoteLLM export in {candidates[0]} (`notellm train` writes it) or {candidates[1]} "
                            "(`notellm job` writes it): train first, or give --export")


def compilation_cache(config) -> Path | None:
    folder = config.serve.compilation_cache_dir
    if folder == "off":
        return None
    return enable_compilation_cache(folder or Path(config.paths.cache_dir).expanduser() / "jax_compilation")


def loader(args: argparse.Namespace, config, access: Access, opened: list) -> Callable:
    """What `Starting` runs behind the bound port: the index, the export, the app (`opened` gets the index, for
    the caller to close)."""
    def load(report: Callable[[str], None]):
        report(f"opening the live index {args.index}")
        index = open_index(config, Path(args.index), args.embeddings)
        opened.append(index)
        repaired = f"; {len(index.repairs)} torn log tail(s) cut off, see the warning above" if index.repairs else ""
        report(f"index {args.index}: {len(index)} notes (replayed {index.replayed} log records{repaired})")
        cache = compilation_cache(config)
        export = Path(args.export) if args.export else default_export(config)
        report(f"loading the export {export} (compilation cache: {cache or 'off'})")
        batch = config.serve.max_batch_size
        encoder = note_encoder(config, export, batch_size=batch, row_buckets=row_buckets(batch), serving=True)
        service = Service(encoder, index, config.serve, open_generator(args, config, export))
        return create_app(service, access, args.docs)
    return load


def run(args: argparse.Namespace, config) -> None:
    access = Access.from_options(args.api_key_file, args.allowed_hosts, args.host)  # a bad keys file stops here
    warn_if_exposed(args.host, access)
    sock = bind(args.host, args.port)  # before any loading: a port in use fails at once
    print(f"[serve] listening on {args.host}:{args.port}; /healthz answers now, /readyz once warmed up", flush=True)
    opened: list = []
    server: uvicorn.Server | None = None

    def stop() -> None:
        server.should_exit = True

    starting = Starting(loader(args, config, access, opened), on_failure=stop)
    # log_config=None: uvicorn's loggers propagate to the root instead of handlers bound to the stderr of the
    # moment (a caller that swaps sys.stderr, pytest's capture included, would leave them writing to a closed file).
    server = uvicorn.Server(uvicorn.Config(starting, log_level="warning", lifespan="on", log_config=None))
    try:
        server.run(sockets=[sock])
    finally:
        for index in opened:
            index.close()
        sock.close()
    if starting.failure is not None:
        raise starting.failure
