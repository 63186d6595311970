"""The weights a training run starts from: a checkpoint of any format (or a random preset) plus [EMB],
born sharded on the run's mesh in the model's param dtype.

A checkpoint is read lazily (`formats.open_params`) and each process reads only the slices its devices
hold (`formats.place_params`); a random preset is initialised by one jitted program with
`out_shardings`. Either way no host or device holds the whole model on the way to its shardings.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from notellm_jax import sharding as shd
from notellm_jax.config import Config
from notellm_jax.model.llama import LlamaConfig, preset
from notellm_jax.model.params import grow_vocab, init_params, stack_layers
from notellm_jax.weights.formats import open_params, place_params


def runtime_fields(config: Config) -> dict[str, Any]:
    """The LlamaConfig fields a run chooses (not the checkpoint)."""
    m = config.model
    return dict(compute_dtype=m.compute_dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers,
                remat_policy=m.remat_policy, vocab_pad_multiple=m.vocab_pad_multiple)


def runtime_llama_config(config: Config, base: LlamaConfig) -> LlamaConfig:
    return base.replace(**runtime_fields(config))


def _check_emb_vocab(emb_vocab_size: int | None, base_vocab: int, ckpt: str) -> None:
    if emb_vocab_size is not None and emb_vocab_size != base_vocab + 1:
        raise ValueError(f"tokenizer has {emb_vocab_size - 1} base tokens but the checkpoint {ckpt} has a "
                         f"{base_vocab}-row embedding table: they do not belong together")


def _random_decoder(base: LlamaConfig, new_tokens: int, seed: int, abstract: dict) -> dict:
    """Random decoder weights made by one jitted program directly in their shardings. Initialised
    unscanned and stacked inside the program, so scan_layers does not change the weights; the [EMB]
    entries and the vocabulary padding as `grow_vocab` makes them."""
    def init(key):
        params = init_params(base.replace(scan_layers=False, vocab_pad_multiple=1), key)
        params, _ = grow_vocab(params, base, new_tokens)
        if base.scan_layers:
            params = stack_layers(params, stack=jnp.stack)
        return jax.tree.map(lambda p, a: p.astype(a.dtype), params, abstract)

    return jax.jit(init, out_shardings=jax.tree.map(lambda a: a.sharding, abstract))(jax.random.key(seed))


def host_to_global(value: Any, target: jax.ShapeDtypeStruct) -> jax.Array:
    """A host array -> the global array `target` describes; each process touches only its devices' slices."""
    value = np.asarray(value)
    return jax.make_array_from_callback(target.shape, target.sharding,
                                        lambda index: value[index].astype(target.dtype))


def load_initial_params(config: Config, emb_vocab_size: int | None, mesh=None,
                        on_leaf: Callable[[str], None] | None = None) -> tuple[dict, LlamaConfig]:
    """Pretrained (or random) decoder weights with the [EMB] row added, plus a fresh projection and logit
    scale, as global arrays on `mesh` (default: the config's) in the model's param dtype. `on_leaf(name)`
    runs after each checkpoint parameter is placed (a hook for memory checks).

    `emb_vocab_size` is the tokenizer's vocabulary including [EMB] (whose id must be the base vocab size).
    """
    from notellm_jax.train.step import abstract_params_on, make_model

    mesh = mesh or shd.mesh_from_config(config.mesh)
    ckpt = config.model.checkpoint
    new_tokens = 0 if emb_vocab_size is None else 1
    if ckpt.startswith("random:"):
        base = runtime_llama_config(config, preset(ckpt.split(":", 1)[1]))
        _check_emb_vocab(emb_vocab_size, base.vocab_size, ckpt)
        llama_cfg = base.replace(vocab_size=base.vocab_size + new_tokens)
        abstract = abstract_params_on(make_model(config, llama_cfg), mesh)
        decoder = _random_decoder(base, new_tokens, config.train.seed, abstract["decoder"])
    else:
        lazy, llama_cfg = open_params(config.resolve(ckpt), new_tokens, **runtime_fields(config))
        _check_emb_vocab(emb_vocab_size, llama_cfg.vocab_size - new_tokens, ckpt)
        abstract = abstract_params_on(make_model(config, llama_cfg), mesh)
        decoder = place_params(lazy, abstract["decoder"], on_leaf)
    rng = np.random.default_rng(config.train.seed)
    proj = rng.normal(0.0, llama_cfg.hidden_size ** -0.5, (llama_cfg.hidden_size, config.model.emb_dim))
    params = {"decoder": decoder, "proj": {"kernel": host_to_global(proj, abstract["proj"]["kernel"])},
              "log_logit_scale": host_to_global(np.asarray(config.model.log_logit_scale_init, np.float32),
                                                abstract["log_logit_scale"])}
    return params, llama_cfg
