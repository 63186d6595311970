"""Convert any supported checkpoint to a Hugging Face folder or the project's orbax format.

    python -m notellm_jax.convert SRC DST [--to hf|orbax] [--overwrite]

SRC: an HF folder, a llama2.c .bin, a .gguf file or an orbax folder (format detected). GGUF weights are
written dequantised (float32).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import notellm_jax  # noqa: F401  (sets USE_TF=0 etc. before transformers/orbax are imported)
from notellm_jax.checkpoints import load_params, save_hf, save_orbax

WRITERS = {"hf": save_hf, "orbax": save_orbax}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m notellm_jax.convert", description=__doc__.split("\n")[0])
    parser.add_argument("src", help="HF folder, llama2.c .bin, .gguf file or orbax folder")
    parser.add_argument("dst", help="output folder")
    parser.add_argument("--to", choices=sorted(WRITERS), default="hf", help="output format (default hf)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty DST")
    args = parser.parse_args(argv)
    notellm_jax.configure_logging()

    dst = Path(args.dst)
    if dst.is_file() or (dst.is_dir() and any(dst.iterdir()) and not args.overwrite):
        parser.error(f"{dst} is a file or a non-empty folder (pass --overwrite to write into a folder)")
    start = time.perf_counter()
    params, cfg = load_params(args.src)
    WRITERS[args.to](params, cfg, dst)
    print(f"converted {args.src} -> {dst} ({args.to}, {cfg.num_params():,} parameters, "
          f"{time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
