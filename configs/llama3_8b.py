"""LLaMA-3.1-8B in the paper's setup: configs/llama2_7b.py with only the model changed.

LLaMA-3 RoPE scaling (factor 8 beyond 8,192 positions), GQA 32/8, untied head, 128k-token vocabulary.
Weights: a Hugging Face Llama-3.1-8B folder (config.json + safetensors; tokenizer files beside them), given
with `--set model.checkpoint=/path/to/Llama-3.1-8B`.

Arguments (`CONFIG.py:ARG`): `aot` (or `random`) keeps the shapes but builds no weights (ahead-of-time
memory planning, bench/plan_memory.py).
"""
import runpy
from pathlib import Path

from notellm_jax.config import Config

_family_config = runpy.run_path(str(Path(__file__).with_name("llama2_7b.py")))["family_config"]


def get_config(arg: str = "") -> Config:
    return _family_config("llama3_8b", "llama3_1_8b", "Llama-3.1-8B", arg)
