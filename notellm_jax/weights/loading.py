"""The weights a training run starts from: a checkpoint of any format (or a random preset) plus [EMB]."""
from __future__ import annotations

import logging

import jax
import numpy as np

from notellm_jax.config import Config
from notellm_jax.model.llama import LlamaConfig, preset
from notellm_jax.model.lora import init_lora
from notellm_jax.model.params import add_tokens, init_params, init_unused_token, stack_layers, untie_head
from notellm_jax.weights.formats import load_params

logger = logging.getLogger(__name__)


def runtime_llama_config(config: Config, base: LlamaConfig) -> LlamaConfig:
    return base.replace(compute_dtype=config.model.compute_dtype, param_dtype=config.model.param_dtype,
                        scan_layers=config.model.scan_layers, remat_policy=config.model.remat_policy,
                        attention=config.model.attention)


def partial_training(config: Config, llama_cfg: LlamaConfig) -> bool:
    """Whether the embedding table is frozen (a bottom is frozen, or LoRA adapts frozen weights)."""
    return 0 < config.model.train_top_layers < llama_cfg.num_hidden_layers or config.model.lora_rank > 0


def load_initial_params(config: Config, emb_vocab_size: int | None) -> tuple[dict, LlamaConfig]:
    """Pretrained (or random) decoder weights with the [EMB] row added, plus a fresh projection and logit scale.

    `emb_vocab_size` is the tokenizer's vocabulary including [EMB] (whose id is the base vocab size: a new
    row, or the first unused row of a table padded beyond its tokenizer).
    """
    ckpt = config.model.checkpoint
    if ckpt.startswith("random:"):
        base = runtime_llama_config(config, preset(ckpt.split(":", 1)[1]))
        decoder = init_params(base.replace(scan_layers=False), jax.random.key(config.train.seed))
    else:
        decoder, base = load_params(config.resolve(ckpt))
        base = runtime_llama_config(config, base)
    if emb_vocab_size is not None:
        emb_id = emb_vocab_size - 1
        if emb_id > base.vocab_size:
            raise ValueError(f"tokenizer has {emb_id} base tokens but the checkpoint {ckpt} has a "
                             f"{base.vocab_size}-row embedding table: they do not belong together")
        if emb_id == base.vocab_size:
            decoder, base = add_tokens(decoder, base, 1)
        else:  # a table padded beyond its tokenizer (Qwen): [EMB] takes the first unused row
            logger.info("[EMB] = id %d, an unused row of the %d-row embedding table", emb_id, base.vocab_size)
            decoder = init_unused_token(decoder, base, emb_id)
    decoder = jax.tree.map(np.asarray, decoder)
    if config.model.untie_head and partial_training(config, base):
        decoder, base = untie_head(decoder, base)
    if base.scan_layers:
        decoder = stack_layers(decoder)
    rng = np.random.default_rng(config.train.seed)
    proj = rng.normal(0.0, base.hidden_size ** -0.5, (base.hidden_size, config.model.emb_dim)).astype(np.float32)
    params = {"decoder": decoder, "proj": {"kernel": proj},
              "log_logit_scale": np.asarray(config.model.log_logit_scale_init, np.float32)}
    if config.model.lora_rank > 0:
        params["lora"] = init_lora(decoder, config.model.lora_rank, config.model.lora_targets, config.train.seed)
    return params, base


