"""NoteLLM's paper recipe (METHOD.md 4) on a 7-8B decoder, for a TPU slice or a GPU cluster (launch/).

Full fine-tune, B=64 pairs of 192-token prompts, lr 3e-6, d=128, alpha 0.01, r 0.4. FSDP over every chip
of the slice, bf16 compute with fp32 parameters and optimizer state, layers scanned and rematerialised.

    notellm train --config configs/paper_7b.py:FAMILY --set model.checkpoint=/path/to/weights
    notellm plan  --config configs/paper_7b.py:FAMILY,aot --devices 8

FAMILY, the first argument, picks the decoder. Each reads a Hugging Face folder (config.json + safetensors,
tokenizer files beside them) given with `--set model.checkpoint=...`; the default is the folder's usual name:

    llama2_7b   LLaMA-2-7B (Llama-2-7b-hf): MHA 32 heads, 32k-token vocabulary, untied head.
    llama3_8b   LLaMA-3.1-8B (Llama-3.1-8B): LLaMA-3 RoPE scaling (factor 8 beyond 8,192 positions),
                GQA 32/8, untied head, 128k-token vocabulary.
    qwen2_5_7b  Qwen2.5-7B (Qwen2.5-7B): q/k/v projection biases, GQA 28/4, untied head, 152k-row
                embedding table (larger than the tokenizer).
    qwen3_8b    Qwen3-8B (Qwen3-8B): per-head q/k RMSNorm, no biases, GQA 32/8, head_dim 128, untied head.
    mistral_7b  Mistral-7B-v0.3 (Mistral-7B-v0.3): GQA 32/8, full attention (v0.3 has no sliding window;
                v0.1's 4,096-token window is longer than the 192-token prompts, so it would be full too).
    gemma2_9b   Gemma-2-9B (gemma-2-9b): GeGLU, four norms a block, attention and final logit soft-capping
                (einsum attention only), local/global layers (4,096-token window), GQA 16/8, head_dim 256,
                tied 256k-token vocabulary.

Further arguments, after the family (`configs/paper_7b.py:qwen3_8b,aot`): `aot` (or `random`) keeps the
family's shapes but builds no weights (ahead-of-time memory planning: `notellm plan`, bench/plan_memory.py).
"""
from notellm_jax.config import Config, ModelConfig, PathsConfig, PromptConfig, TrainConfig, parse_arg
from notellm_jax.errors import ConfigError

# family: (architecture preset of `model.llama.PRESETS`, default Hugging Face folder)
FAMILIES = {
    "llama2_7b": ("llama2_7b", "Llama-2-7b-hf"),
    "llama3_8b": ("llama3_1_8b", "Llama-3.1-8B"),
    "qwen2_5_7b": ("qwen2_5_7b", "Qwen2.5-7B"),
    "qwen3_8b": ("qwen3_8b", "Qwen3-8B"),
    "mistral_7b": ("mistral_7b", "Mistral-7B-v0.3"),
    "gemma2_9b": ("gemma2_9b", "gemma-2-9b"),
}


def get_config(arg: str = "") -> Config:
    family, _, rest = arg.partition(",")
    if family not in FAMILIES:
        raise ConfigError(f"configs/paper_7b.py needs a family as its first argument (configs/paper_7b.py:FAMILY), "
                          f"one of {', '.join(FAMILIES)}; got {family!r}")
    args = parse_arg(rest, aot=False, random=False)
    preset, checkpoint = FAMILIES[family]
    return Config(
        name=family,
        paths=PathsConfig(work_dir=f"runs/{family}"),
        model=ModelConfig(checkpoint=f"random:{preset}" if args.aot or args.random else checkpoint,
                          compute_dtype="bfloat16", scan_layers=True,
                          remat_policy="dots_with_no_batch_dims_saveable"),
        prompt=PromptConfig(max_length=192),
        train=TrainConfig(batch_pairs=64, checkpoint_every=500, eval_every=500),
    )
