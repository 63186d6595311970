"""Qwen2.5-7B in the paper's setup: configs/llama2_7b.py with only the model changed.

q/k/v projection biases, GQA 28/4, untied head, 152k-row embedding table (larger than the tokenizer).
Weights: a Hugging Face Qwen2.5-7B folder (config.json + safetensors; tokenizer files beside them), given
with `--set model.checkpoint=/path/to/Qwen2.5-7B`.

Arguments (`CONFIG.py:ARG`): `aot` (or `random`) keeps the shapes but builds no weights (ahead-of-time
memory planning, bench/plan_memory.py).
"""
from pathlib import Path

from notellm_jax.config import Config, load_config, override, parse_arg


def get_config(arg: str = "") -> Config:
    args = parse_arg(arg, aot=False, random=False)
    random = args.aot or args.random
    paper = load_config(str(Path(__file__).with_name("llama2_7b.py")) + (":aot" if random else ""))
    return override(paper, {"name": "qwen2_5_7b", "paths.work_dir": "runs/qwen2_5_7b",
                            "model.checkpoint": "random:qwen2_5_7b" if random else "Qwen2.5-7B"})
