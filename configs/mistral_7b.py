"""Mistral-7B-v0.3 in the paper's setup: configs/llama2_7b.py with only the model changed.

GQA 32/8, full attention (v0.3 has no sliding window; v0.1's 4,096-token window is longer than NoteLLM's 192-token prompts, so it would be full attention too).
Weights: a Hugging Face Mistral-7B-v0.3 folder (config.json + safetensors; tokenizer files beside them), given
with `--set model.checkpoint=/path/to/Mistral-7B-v0.3`.

Arguments (`CONFIG.py:ARG`): `aot` (or `random`) keeps the shapes but builds no weights (ahead-of-time
memory planning, bench/plan_memory.py).
"""
import runpy
from pathlib import Path

from notellm_jax.config import Config

_family_config = runpy.run_path(str(Path(__file__).with_name("llama2_7b.py")))["family_config"]


def get_config(arg: str = "") -> Config:
    return _family_config("mistral_7b", "mistral_7b", "Mistral-7B-v0.3", arg)
