"""Qwen3-8B in the paper's setup: configs/llama2_7b.py with only the model changed.

per-head q/k RMSNorm, no biases, GQA 32/8, head_dim 128, untied head.
Weights: a Hugging Face Qwen3-8B folder (config.json + safetensors; tokenizer files beside them), given
with `--set model.checkpoint=/path/to/Qwen3-8B`.

Arguments (`CONFIG.py:ARG`): `aot` (or `random`) keeps the shapes but builds no weights (ahead-of-time
memory planning, bench/plan_memory.py).
"""
import runpy
from pathlib import Path

from notellm_jax.config import Config

_family_config = runpy.run_path(str(Path(__file__).with_name("llama2_7b.py")))["family_config"]


def get_config(arg: str = "") -> Config:
    return _family_config("qwen3_8b", "qwen3_8b", "Qwen3-8B", arg)
