"""Convert any supported checkpoint to a Hugging Face folder or the project's orbax format.

    notellm convert SRC DST [--to hf|orbax] [--overwrite]

SRC: an HF folder, a llama2.c .bin, a .gguf file or an orbax folder (format detected). GGUF weights are
written dequantised (float32). The `notellm convert` command itself is `infer.export_formats`, which also
takes a trained NoteLLM export (`--to hf|sentence-transformers`) and hands weight files to `run` here.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from notellm_jax.errors import ConfigError
from notellm_jax.weights.formats import load_params
from notellm_jax.weights.hf import save_hf
from notellm_jax.weights.orbax import save_orbax

WRITERS = {"hf": save_hf, "orbax": save_orbax}


def add_arguments(parser: argparse.ArgumentParser, targets: tuple[str, ...] = tuple(WRITERS)) -> None:
    parser.add_argument("src", help="HF folder, llama2.c .bin, .gguf file or orbax folder")
    parser.add_argument("dst", help="output folder")
    parser.add_argument("--to", choices=targets, default="hf", help="output format (default hf)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty DST")


def check_destination(dst: str | Path, overwrite: bool) -> Path:
    """DST as a Path: a new or empty folder, or any folder with `overwrite`; never a file."""
    dst = Path(dst)
    if dst.is_file() or (dst.is_dir() and any(dst.iterdir()) and not overwrite):
        raise ConfigError(f"{dst} is a file or a non-empty folder (pass --overwrite to write into a folder)")
    return dst


def run(args, config=None) -> Path:
    """`notellm convert`: read SRC (any format) and write DST in `--to`'s format."""
    dst = check_destination(args.dst, args.overwrite)
    start = time.perf_counter()
    params, cfg = load_params(args.src)
    WRITERS[args.to](params, cfg, dst)
    print(f"converted {args.src} -> {dst} ({args.to}, {cfg.num_params():,} parameters, "
          f"{time.perf_counter() - start:.1f} s)")
    return dst
