"""Mistral-7B-v0.3 in the paper's setup: configs/llama2_7b.py with only the model changed.

GQA 32/8, full attention (v0.3 has no sliding window; v0.1's 4,096-token window is longer than NoteLLM's 192-token prompts, so it would be full attention too).
Weights: a Hugging Face Mistral-7B-v0.3 folder (config.json + safetensors; tokenizer files beside them), given
with `--set model.checkpoint=/path/to/Mistral-7B-v0.3`.

Arguments (`CONFIG.py:ARG`): `aot` (or `random`) keeps the shapes but builds no weights (ahead-of-time
memory planning, bench/plan_memory.py).
"""
from pathlib import Path

from notellm_jax.config import Config, load_config, override, parse_arg


def get_config(arg: str = "") -> Config:
    args = parse_arg(arg, aot=False, random=False)
    random = args.aot or args.random
    paper = load_config(str(Path(__file__).with_name("llama2_7b.py")) + (":aot" if random else ""))
    return override(paper, {"name": "mistral_7b", "paths.work_dir": "runs/mistral_7b",
                            "model.checkpoint": "random:mistral_7b" if random else "Mistral-7B-v0.3"})
