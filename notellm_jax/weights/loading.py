"""The weights a training run starts from: a checkpoint of any format (or a random preset) plus [EMB],
born sharded on the run's mesh in the model's param dtype.

A checkpoint is read lazily (`formats.open_params`) and each process reads only the slices its devices
hold (`formats.place_params`); a random preset is initialised by one jitted program with
`out_shardings`. Either way no host or device holds the whole model on the way to its shardings. The
[EMB] row, the vocabulary padding, an untied head copy and the scan stacking are views of the lazy
checkpoint (or steps of the jitted init), so they never materialise a whole table either.

`open_initial_params` only opens the weights (a checkpoint's headers): the model config and the abstract
parameters are known before any weight is read, so a resumed run restores its checkpoint without ever
reading the initial weights (`InitialWeights.read` is the read).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from notellm_jax import sharding as shd
from notellm_jax.config import Config
from notellm_jax.model.families import LlamaConfig, preset
from notellm_jax.model.lora import init_lora
from notellm_jax.model.notellm import NoteLLM
from notellm_jax.model.params import (abstract_params_on, emb_growth, frozen_layer_count, grow_vocab, init_params,
                                      stack_layers, untie_head)
from notellm_jax.weights.formats import open_params, place_params
from notellm_jax.weights.lazy import Transposed


def make_model(config: Config, llama_cfg: LlamaConfig) -> NoteLLM:
    """The run's NoteLLM (decoder + [EMB] projection and logit scale) for the decoder config `llama_cfg`."""
    return NoteLLM(llama_cfg, emb_dim=config.model.emb_dim, log_logit_scale_init=config.model.log_logit_scale_init,
                   **model_levers(config, llama_cfg))


def model_levers(config: Config, llama_cfg: LlamaConfig) -> dict[str, Any]:
    """The NoteLLM fields of the attention and pooling levers (recorded in the export, `save_notellm`):
    the bidirectional prefix starts at the first trained layer, so a frozen (cached) bottom stays causal."""
    start = frozen_layer_count(config.model.train_top_layers, llama_cfg) if config.model.prefix_bidirectional else -1
    return {"bidirectional_from": start, "pooling": config.model.pooling}


def runtime_fields(config: Config) -> dict[str, Any]:
    """The LlamaConfig fields a run chooses (not the checkpoint)."""
    m = config.model
    return dict(compute_dtype=m.compute_dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers,
                remat_policy=m.remat_policy, attention=m.attention, vocab_pad_multiple=m.vocab_pad_multiple)


def runtime_llama_config(config: Config, base: LlamaConfig) -> LlamaConfig:
    return base.replace(**runtime_fields(config))


def partial_training(config: Config, llama_cfg: LlamaConfig) -> bool:
    """Whether the embedding table is frozen (a bottom is frozen, or LoRA adapts frozen weights)."""
    return 0 < config.model.train_top_layers < llama_cfg.num_hidden_layers or config.model.lora_rank > 0


Reader = Callable[[Callable[[str], None] | None], dict]


def _random_decoder(config: Config, base: LlamaConfig, emb_id: int | None,
                    abstract_of: Callable[[LlamaConfig], dict]) -> tuple[Reader, LlamaConfig, dict]:
    """Random decoder weights made by one jitted program directly in their shardings. Initialised
    unscanned and stacked inside the program, so scan_layers does not change the weights; the [EMB]
    entry, the vocabulary padding and an untied head copy as `grow_vocab` / `untie_head` make them."""
    n_new, reset = emb_growth(base, emb_id, config.model.checkpoint)
    cfg = base.replace(vocab_size=base.vocab_size + n_new)
    untie = config.model.untie_head and partial_training(config, cfg) and cfg.tie_word_embeddings
    if untie:
        cfg = cfg.replace(tie_word_embeddings=False)
    abstract = abstract_of(cfg)
    target = abstract["decoder"]

    def init(key):
        params = init_params(base.replace(scan_layers=False, vocab_pad_multiple=1), key)
        params, grown = grow_vocab(params, base, n_new, reset)
        if untie:
            params, _ = untie_head(params, grown, transpose=jnp.transpose)
        if base.scan_layers:
            params = stack_layers(params, stack=jnp.stack)
        return jax.tree.map(lambda p, a: p.astype(a.dtype), params, target)

    out_shardings = jax.tree.map(lambda a: a.sharding, target)
    read = lambda on_leaf: jax.jit(init, out_shardings=out_shardings)(jax.random.key(config.train.seed))  # noqa: E731
    return read, cfg, abstract


def _checkpoint_decoder(config: Config, emb_id: int | None,
                        abstract_of: Callable[[LlamaConfig], dict]) -> tuple[Reader, LlamaConfig, dict]:
    """A checkpoint's decoder opened (`open_params`: headers only), read slice by slice into its shardings
    by the returned reader (`place_params`)."""
    lazy, cfg = open_params(config.resolve(config.model.checkpoint), emb_id, **runtime_fields(config))
    if config.model.untie_head and partial_training(config, cfg):
        lazy, cfg = untie_head(lazy, cfg, transpose=Transposed)
    abstract = abstract_of(cfg)
    return (lambda on_leaf: place_params(lazy, abstract["decoder"], on_leaf)), cfg, abstract


@dataclasses.dataclass
class InitialWeights:
    """The weights a run starts from, opened but not read: `llama_cfg` (with [EMB]) and `abstract` (every
    parameter's ShapeDtypeStruct with its sharding) are known; `read` reads them."""
    config: Config
    llama_cfg: LlamaConfig
    abstract: dict
    read_decoder: Reader

    def read(self, on_leaf: Callable[[str], None] | None = None) -> dict:
        """The decoder weights plus a fresh projection and logit scale (and LoRA adapters) as global arrays
        in their shardings; `on_leaf(name)` runs after each checkpoint parameter is placed."""
        config, abstract = self.config, self.abstract
        decoder = self.read_decoder(on_leaf)
        rng = np.random.default_rng(config.train.seed)
        hidden = self.llama_cfg.hidden_size
        proj = rng.normal(0.0, hidden ** -0.5, (hidden, config.model.emb_dim))
        params = {"decoder": decoder, "proj": {"kernel": shd.host_to_global(proj, abstract["proj"]["kernel"])},
                  "log_logit_scale": shd.host_to_global(np.asarray(config.model.log_logit_scale_init, np.float32),
                                                        abstract["log_logit_scale"])}
        if config.model.lora_rank > 0:  # host arrays (small); create_state places them
            params["lora"] = init_lora(decoder, config.model.lora_rank, config.model.lora_targets, config.train.seed,
                                       frozen_layer_count(config.model.train_top_layers, self.llama_cfg))
        if "pooler" in abstract:  # model.pooling="attention": a zero query starts as the mean
            params["pooler"] = {"query": shd.host_to_global(np.zeros((hidden,), np.float32),
                                                            abstract["pooler"]["query"])}
        return params


def open_initial_params(config: Config, emb_vocab_size: int | None, mesh=None) -> InitialWeights:
    """The run's initial weights opened on `mesh` (default: the config's): a pretrained checkpoint (its
    headers read) or a random preset, with the [EMB] row. Nothing is read until `InitialWeights.read`.

    `emb_vocab_size` is the tokenizer's vocabulary including [EMB] (whose id is the base vocab size: a new
    row, or the first unused row of a table padded beyond its tokenizer).
    """
    mesh = mesh or shd.mesh_from_config(config.mesh)
    abstract_of = lambda cfg: abstract_params_on(make_model(config, cfg), mesh)  # noqa: E731
    ckpt = config.model.checkpoint
    emb_id = None if emb_vocab_size is None else emb_vocab_size - 1
    if ckpt.startswith("random:"):
        base = runtime_llama_config(config, preset(ckpt.split(":", 1)[1]))
        read, llama_cfg, abstract = _random_decoder(config, base, emb_id, abstract_of)
    else:
        read, llama_cfg, abstract = _checkpoint_decoder(config, emb_id, abstract_of)
    return InitialWeights(config, llama_cfg, abstract, read)


def load_initial_params(config: Config, emb_vocab_size: int | None, mesh=None,
                        on_leaf: Callable[[str], None] | None = None) -> tuple[dict, LlamaConfig]:
    """Pretrained (or random) decoder weights with the [EMB] row added, plus a fresh projection and logit
    scale (and LoRA adapters), as global arrays on `mesh` (default: the config's) in the model's param
    dtype: `open_initial_params(...).read(on_leaf)`. `on_leaf(name)` runs after each checkpoint parameter
    is placed (a hook for memory checks)."""
    initial = open_initial_params(config, emb_vocab_size, mesh)
    return initial.read(on_leaf), initial.llama_cfg
