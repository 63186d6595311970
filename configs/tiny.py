"""Tiny run for tests and laptops: the real stories260K LLaMA (260K params) on four small Stack Exchange sites.

About a second per step on a 2-core CPU. The 260K-parameter model is far too small to learn general note
similarity in minutes (its contrastive loss barely moves over 300 steps on the full pairs), so this config
fits a seeded sample of 64 real training pairs for 12 epochs: a check that data, prompts, both losses,
sharding, checkpoints and export work together, not a useful recommender. `get_config("random")` swaps in
a randomly initialised model of the same shape.
"""
from notellm_jax.config import Config


def get_config(arg: str = "") -> Config:
    c = Config(name="tiny")
    c.paths.work_dir = "runs/tiny"
    # Four small sites of similar size (about 140-230 questions each): balanced categories.
    c.data.sites = ["coffee.stackexchange.com", "gadgets.stackexchange.com", "genai.stackexchange.com",
                    "htw.stackexchange.com"]
    c.data.num_shards = 2
    c.data.max_train_pairs = 64
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
    c.train.epochs = 12
    c.train.learning_rate = 2e-3
    c.train.warmup_fraction = 0.1
    c.train.log_every = 8
    c.train.checkpoint_every = 20
    c.train.eval_batches = 2
    c.train.async_checkpoint = False
    return c
