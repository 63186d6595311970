"""Qwen2.5-7B in the paper's setup: configs/llama2_7b.py with only the model changed.

q/k/v projection biases, GQA 28/4, untied head, 152k-row embedding table (larger than the tokenizer).
Weights: a Hugging Face Qwen2.5-7B folder (config.json + safetensors; tokenizer files beside them), given
with `--set model.checkpoint=/path/to/Qwen2.5-7B`.

Arguments (`CONFIG.py:ARG`): `aot` (or `random`) keeps the shapes but builds no weights (ahead-of-time
memory planning, bench/plan_memory.py).
"""
import runpy
from pathlib import Path

from notellm_jax.config import Config

_family_config = runpy.run_path(str(Path(__file__).with_name("llama2_7b.py")))["family_config"]


def get_config(arg: str = "") -> Config:
    return _family_config("qwen2_5_7b", "qwen2_5_7b", "Qwen2.5-7B", arg)
