"""Qwen3-8B in the paper's setup: configs/llama2_7b.py with only the model changed.

per-head q/k RMSNorm, no biases, GQA 32/8, head_dim 128, untied head.
Weights: a Hugging Face Qwen3-8B folder (config.json + safetensors; tokenizer files beside them), given
with `--set model.checkpoint=/path/to/Qwen3-8B`.

Arguments (`CONFIG.py:ARG`): `aot` (or `random`) keeps the shapes but builds no weights (ahead-of-time
memory planning, bench/plan_memory.py).
"""
from pathlib import Path

from notellm_jax.config import Config, load_config, override, parse_arg


def get_config(arg: str = "") -> Config:
    args = parse_arg(arg, aot=False, random=False)
    random = args.aot or args.random
    paper = load_config(str(Path(__file__).with_name("llama2_7b.py")) + (":aot" if random else ""))
    return override(paper, {"name": "qwen3_8b", "paths.work_dir": "runs/qwen3_8b",
                            "model.checkpoint": "random:qwen3_8b" if random else "Qwen3-8B"})
