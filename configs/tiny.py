"""Tiny run for tests and laptops: the real stories260K LLaMA (260K params) on three Stack Exchange sites.

Seconds per step on a 2-core CPU. `get_config("random")` swaps in a randomly initialised 4-layer model.
"""
from notellm_jax.config import Config


def get_config(arg: str = "") -> Config:
    c = Config(name="tiny")
    c.paths.work_dir = "runs/tiny"
    c.data.sites = ["coffee.stackexchange.com", "beer.stackexchange.com", "htw.stackexchange.com"]
    c.data.num_shards = 2
    c.model.checkpoint = "models/stories260K/stories260K.bin"
    c.model.tokenizer = "models/stories260K/tok512.model"
    if arg == "random":
        c.model.checkpoint = "random:stories260k"
    c.model.emb_dim = 32
    c.prompt.title_max_tokens = 16
    c.prompt.content_max_tokens = 32
    c.prompt.max_length = 256
    c.prompt.max_targets = 32
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.train.batch_pairs = 8
    c.train.max_steps = 40
    c.train.learning_rate = 3e-3
    c.train.warmup_fraction = 0.1
    c.train.log_every = 5
    c.train.checkpoint_every = 20
    c.train.eval_batches = 2
    c.train.async_checkpoint = False
    return c
