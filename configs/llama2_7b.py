"""The paper's setup (METHOD.md 4): LLaMA-2-7B full fine-tune, B=64 pairs, lr 3e-6, d=128, alpha 0.01, r 0.4.

Weights: a Hugging Face LLaMA-2-7B folder (config.json + safetensors), given with
`--set model.checkpoint=/path/to/Llama-2-7b-hf`. FSDP over every chip of the slice, bf16 compute with
fp32 parameters and optimizer state, layers scanned and rematerialised. `get_config("aot")` keeps the
shapes but builds no weights (ahead-of-time memory planning, bench/plan_memory.py).
"""
from notellm_jax.config import Config


def get_config(arg: str = "") -> Config:
    c = Config(name="llama2_7b")
    c.paths.work_dir = "runs/llama2_7b"
    c.model.checkpoint = "random:llama2_7b" if arg == "aot" else "Llama-2-7b-hf"
    c.model.emb_dim = 128
    c.model.compute_dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.scan_layers = True
    c.model.remat_policy = "dots_with_no_batch_dims_saveable"
    c.prompt.layout = "paper"
    c.prompt.title_max_tokens = 20
    c.prompt.content_max_tokens = 80
    c.prompt.max_length = 192
    c.prompt.max_targets = 32
    c.prompt.hashtag_fraction = 0.4
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.train.batch_pairs = 64
    c.train.epochs = 1.0
    c.train.learning_rate = 3e-6
    c.train.weight_decay = 0.001
    c.train.warmup_fraction = 0.1
    c.train.schedule = "linear"
    c.train.grad_clip = 1.0
    c.train.alpha = 0.01
    c.train.log_every = 10
    c.train.checkpoint_every = 500
    c.train.eval_every = 500
    c.data.test_time_quantile = 0.8
    return c
