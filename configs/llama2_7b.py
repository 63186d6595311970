"""The paper's setup (METHOD.md 4): LLaMA-2-7B full fine-tune, B=64 pairs, lr 3e-6, d=128, alpha 0.01, r 0.4.

Weights: a Hugging Face LLaMA-2-7B folder (config.json + safetensors), given with
`--set model.checkpoint=/path/to/Llama-2-7b-hf`. FSDP over every chip of the slice, bf16 compute with
fp32 parameters and optimizer state, layers scanned and rematerialised.

Arguments (`configs/llama2_7b.py:ARG`): `aot` keeps the shapes but builds no weights (ahead-of-time memory
planning, bench/plan_memory.py).
"""
from notellm_jax.config import Config, ModelConfig, PathsConfig, PromptConfig, TrainConfig, override, parse_arg


def get_config(arg: str = "") -> Config:
    args = parse_arg(arg, aot=False)
    return Config(
        name="llama2_7b",
        paths=PathsConfig(work_dir="runs/llama2_7b"),
        model=ModelConfig(checkpoint="random:llama2_7b" if args.aot else "Llama-2-7b-hf", compute_dtype="bfloat16",
                          scan_layers=True, remat_policy="dots_with_no_batch_dims_saveable"),
        prompt=PromptConfig(max_length=192),
        train=TrainConfig(batch_pairs=64, checkpoint_every=500, eval_every=500),
    )


def family_config(name: str, preset: str, checkpoint: str, arg: str = "") -> Config:
    """This setup with only the model changed (configs/llama3_8b.py, mistral_7b.py, qwen2_5_7b.py, qwen3_8b.py):
    `aot` or `random` keeps the shapes of `preset` and builds no weights; otherwise `checkpoint` is read."""
    args = parse_arg(arg, aot=False, random=False)
    random = args.aot or args.random
    return override(get_config("aot" if random else ""),
                    {"name": name, "paths.work_dir": f"runs/{name}",
                     "model.checkpoint": f"random:{preset}" if random else checkpoint})
