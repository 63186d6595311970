"""Tiny run for tests and laptops: the real stories260K LLaMA (260K params) on four small Stack Exchange sites.

About a second per step on a 2-core CPU. The 260K-parameter model is far too small to learn general note
similarity in minutes (its contrastive loss barely moves over 300 steps on the full pairs), so this config
fits a seeded sample of 64 real training pairs for 12 epochs: a check that data, prompts, both losses,
sharding, checkpoints and export work together, not a useful recommender.

Arguments (`configs/tiny.py:ARG`): `random` swaps in a randomly initialised model of the same shape.
"""
from notellm_jax.config import (Config, DataConfig, ModelConfig, PathsConfig, PromptConfig, TrainConfig, override,
                                parse_arg)


def get_config(arg: str = "") -> Config:
    args = parse_arg(arg, random=False)
    config = Config(
        name="tiny",
        paths=PathsConfig(work_dir="runs/tiny"),
        # Four small sites of similar size (about 140-230 questions each): balanced categories.
        data=DataConfig(sites=("coffee.stackexchange.com", "gadgets.stackexchange.com", "genai.stackexchange.com",
                               "htw.stackexchange.com"), num_shards=2, max_train_pairs=64),
        model=ModelConfig(tokenizer="models/stories260K/tok512.model", emb_dim=32),
        prompt=PromptConfig(title_max_tokens=16, content_max_tokens=32, max_length=256),
        train=TrainConfig(batch_pairs=8, epochs=12, learning_rate=2e-3, log_every=8, checkpoint_every=20,
                          eval_batches=2, async_checkpoint=False),
    )
    if args.random:
        config = override(config, {"model.checkpoint": "random:stories260k"})
    return config
