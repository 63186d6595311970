"""The parameter tree: random init, abstract shapes, scan stacking, [EMB] growth, the frozen/trainable split.

Host-side numpy throughout where a tree is rebuilt (stacking, growth), so a big model never lands on one
device on its way to being sharded.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.traverse_util import flatten_dict, unflatten_dict

from notellm_jax.model.llama import Llama, LlamaConfig

Params = dict[str, Any]

_LAYER_KEY = re.compile(r"layers_(\d+)$")


def layer_number(key: str) -> int | None:
    """i for an unstacked layer subtree name `layers_{i}`, else None."""
    match = _LAYER_KEY.match(key)
    return int(match.group(1)) if match else None


def abstract_params(config: LlamaConfig) -> Any:
    """Boxed (logically partitioned) ShapeDtypeStructs of the decoder parameters; nothing is allocated."""
    model = Llama(config)
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda rng: model.init(rng, ids, method=Llama.init_all)["params"], jax.random.key(0))


def init_params(config: LlamaConfig, rng: jax.Array) -> Any:
    """Randomly initialised, unboxed decoder parameters (small models and tests)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return nn.meta.unbox(Llama(config).init(rng, ids, method=Llama.init_all)["params"])


def stack_layers(params: Params) -> Params:
    """layers_{i}/... subtrees -> one `layers/layer/...` subtree with a leading layer axis (scan layout)."""
    layer_keys = sorted((k for k in params if layer_number(k) is not None), key=layer_number)
    if not layer_keys:
        return params
    stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *[params[k] for k in layer_keys])
    out = {k: v for k, v in params.items() if k not in layer_keys}
    out["layers"] = {"layer": stacked}
    return out


def unstack_layers(params: Params) -> Params:
    """Inverse of `stack_layers`."""
    if "layers" not in params:
        return params
    stacked = params["layers"]["layer"]
    n = jax.tree.leaves(stacked)[0].shape[0]
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(n):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return out


def add_tokens(params: Params, cfg: LlamaConfig, n_new: int = 1) -> tuple[Params, LlamaConfig]:
    """Append `n_new` vocabulary entries (NoteLLM's [EMB]) without changing any existing token's logit.

    New input-embedding rows are the mean of the existing rows. An untied head gets new columns equal to
    the mean of the existing columns, so a new token's logit is the mean of the old logits, exactly as
    for a tied head (whose output row is the new embedding row): the logits of existing tokens, and so
    the softmax restricted to the old vocabulary, are unchanged, and the new token starts improbable.
    """
    if n_new < 1:
        raise ValueError(f"n_new must be >= 1, got {n_new}")

    def grow(table: Any, axis: int) -> np.ndarray:
        table = np.asarray(table)
        mean = np.mean(table.astype(np.float32), axis=axis, keepdims=True).astype(table.dtype)
        return np.concatenate([table, np.repeat(mean, n_new, axis=axis)], axis=axis)

    return _map_token_tables(params, cfg, grow), cfg.replace(vocab_size=cfg.vocab_size + n_new)


def init_unused_token(params: Params, cfg: LlamaConfig, token_id: int) -> Params:
    """Give an existing but unused row `token_id` (an embedding table padded beyond its tokenizer, as
    Qwen's: 151,936 rows for 151,665 tokens) the value `add_tokens` gives a new token: the mean of the
    rows [0, token_id), and an untied head column the mean of those columns. Only that token's logit
    changes."""
    if not 0 < token_id < cfg.vocab_size:
        raise ValueError(f"token id {token_id} is not an existing row of the {cfg.vocab_size}-row table")

    def reset(table: Any, axis: int) -> np.ndarray:
        table = np.array(table)
        used = np.take(table, np.arange(token_id), axis=axis).astype(np.float32)
        index = [slice(None)] * table.ndim
        index[axis] = slice(token_id, token_id + 1)
        table[tuple(index)] = np.mean(used, axis=axis, keepdims=True).astype(table.dtype)
        return table

    return _map_token_tables(params, cfg, reset)


def _map_token_tables(params: Params, cfg: LlamaConfig, fn: Callable[[Any, int], np.ndarray]) -> Params:
    """`fn(table, token_axis)` applied to the input embedding and, if untied, the head kernel."""
    params = dict(params)
    params["embed_tokens"] = {"embedding": fn(params["embed_tokens"]["embedding"], 0)}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": fn(params["lm_head"]["kernel"], 1)}
    return params


# ----------------------------------------------------------------------------------------------------
# Partial training: the embedding table and the bottom layers frozen (or every base weight, with LoRA)


def untie_head(decoder: dict, cfg: LlamaConfig) -> tuple[dict, LlamaConfig]:
    """A tied model made untied: `lm_head/kernel` = a copy of the embedding table's rows (same logits).

    Used under partial training (train_top_layers, LoRA), where the embedding table is frozen: tied, the
    head would be frozen with it and CSFT could not learn. A trainable untied copy is chosen over training
    the tied rows with the input side held fixed because the frozen bottom's features (and their cache)
    depend on the input table: they stay valid only if that table never moves, which needs two copies
    anyway. Exports then carry an untied head (tie_word_embeddings false), which HF loads as is.
    """
    if not cfg.tie_word_embeddings:
        return decoder, cfg
    table = decoder["embed_tokens"]["embedding"]
    return {**decoder, "lm_head": {"kernel": np.array(np.asarray(table).T)}}, cfg.replace(tie_word_embeddings=False)


def frozen_layer_count(train_top_layers: int, cfg: LlamaConfig) -> int:
    """Decoder layers below the trained top `train_top_layers` (0 = everything trains)."""
    if train_top_layers <= 0 or train_top_layers >= cfg.num_hidden_layers:
        return 0
    if cfg.scan_layers:
        raise ValueError("model.train_top_layers needs model.scan_layers=False (frozen layers are sliced off)")
    return cfg.num_hidden_layers - train_top_layers


def _is_frozen(path: tuple[str, ...], frozen_layers: int, lora: bool) -> bool:
    if lora:  # every base weight except an untied head (whose copy exists to be trained)
        return path[0] == "decoder" and path[1] != "lm_head"
    if frozen_layers == 0 or path[0] != "decoder":
        return False
    if path[1] == "embed_tokens":
        return True
    layer = layer_number(path[1])
    return layer is not None and layer < frozen_layers


def split_params(params: Params, frozen_layers: int) -> tuple[Params, Params]:
    """(trainable, frozen): the embedding table and layers [0, frozen_layers) are frozen; with LoRA adapters
    in `params` ("lora"), every base decoder weight but an untied head."""
    flat = flatten_dict(params)
    lora = "lora" in params
    trainable = {k: v for k, v in flat.items() if not _is_frozen(k, frozen_layers, lora)}
    frozen = {k: v for k, v in flat.items() if _is_frozen(k, frozen_layers, lora)}
    return unflatten_dict(trainable), (unflatten_dict(frozen) if frozen else {})


def merge_params(trainable: Params, frozen: Params) -> Params:
    if not frozen:
        return trainable
    return unflatten_dict({**flatten_dict(frozen), **flatten_dict(trainable)})
