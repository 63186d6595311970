"""The parameter tree: random init, abstract shapes (with their shardings), scan stacking, [EMB] growth, the
frozen/trainable split.

Host-side numpy throughout where a tree is rebuilt (stacking, growth), so a big model never lands on one
device on its way to being sharded.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.traverse_util import flatten_dict, unflatten_dict

from notellm_jax import sharding as shd
from notellm_jax.errors import CheckpointError
from notellm_jax.model.batch import BatchDims, batch_shapes
from notellm_jax.model.families import LlamaConfig
from notellm_jax.model.llama import Llama

logger = logging.getLogger(__name__)
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


def sharded_abstract_params(config: LlamaConfig, mesh) -> Any:
    """Unboxed ShapeDtypeStructs of the decoder parameters carrying their NamedShardings on `mesh`."""
    return shd.abstract_on(abstract_params(config), mesh)


def example_batch(rows: int = 2, length: int = 8, targets: int = 2) -> dict[str, jax.Array]:
    """The smallest pipeline batch (`model.batch.PIPELINE_KEYS`), for shape inference and init: zeros,
    with every token real."""
    shapes = batch_shapes(BatchDims(rows, length, targets))
    return {k: (jnp.ones if k == "attention_mask" else jnp.zeros)(s, d) for k, (s, d) in shapes.items()}


def abstract_boxed_params(model: nn.Module) -> Any:
    """Logically partitioned ShapeDtypeStructs of every parameter of a NoteLLM `model`; nothing is allocated."""
    return jax.eval_shape(lambda rng: model.init(rng, example_batch())["params"], jax.random.key(0))


def abstract_params_on(model: nn.Module, mesh) -> dict:
    """ShapeDtypeStructs of every parameter of a NoteLLM `model` carrying its NamedSharding on `mesh`."""
    return shd.abstract_on(abstract_boxed_params(model), mesh)


def init_params(config: LlamaConfig, rng: jax.Array) -> Any:
    """Randomly initialised, unboxed decoder parameters (small models and tests)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return nn.meta.unbox(Llama(config).init(rng, ids, method=Llama.init_all)["params"])


def _host_stack(values) -> np.ndarray:
    return np.stack([np.asarray(v) for v in values])


def stack_layers(params: Params, stack=_host_stack) -> Params:
    """layers_{i}/... subtrees -> one `layers/layer/...` subtree with a leading layer axis (scan layout).
    `stack` joins one parameter's per-layer values: numpy on the host by default, jnp.stack inside jit,
    or a lazy stack (`weights.lazy.Stacked`)."""
    layer_keys = sorted((k for k in params if layer_number(k) is not None), key=layer_number)
    if not layer_keys:
        return params
    stacked = jax.tree.map(lambda *xs: stack(xs), *[params[k] for k in layer_keys])
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


def grow_table(real: Any, mean: Any, n_new: int, n_pad: int, axis: int, xp=np) -> Any:
    """[real, n_new copies of mean, n_pad zeros] along `axis` (xp: numpy on the host, jnp inside jit)."""
    pad_shape = list(real.shape)
    pad_shape[axis] = n_pad
    return xp.concatenate([real, xp.repeat(mean.astype(real.dtype), n_new, axis=axis),
                           xp.zeros(pad_shape, real.dtype)], axis=axis)


def emb_growth(cfg: LlamaConfig, emb_id: int | None, source: Any = "checkpoint") -> tuple[int, int | None]:
    """`grow_vocab`'s (n_new, reset) that gives [EMB] the id `emb_id` (the tokenizer's base vocabulary
    size) in `cfg`'s table: a new entry when the table ends there, the first unused row of a table padded
    beyond its tokenizer (Qwen) otherwise; (0, None) without [EMB]."""
    if emb_id is None:
        return 0, None
    if emb_id > cfg.vocab_size:
        raise CheckpointError(f"tokenizer has {emb_id} base tokens but the checkpoint {source} has a "
                              f"{cfg.vocab_size}-row embedding table: they do not belong together")
    if emb_id == cfg.vocab_size:
        return 1, None
    logger.info("[EMB] = id %d, an unused row of the %d-row embedding table", emb_id, cfg.vocab_size)
    return 0, emb_id


def grow_vocab(params: Params, cfg: LlamaConfig, n_new: int = 0,
               reset: int | None = None) -> tuple[Params, LlamaConfig]:
    """The token tables with `n_new` (>= 0) entries appended equal to the mean of the existing ones
    (`add_tokens`), or the existing row `reset` set to the mean of the rows before it
    (`init_unused_token`), then zero-padded to the grown config's `padded_vocab_size` (numpy for host
    arrays, jnp for jax or traced ones, so it runs inside a jitted init too)."""
    grown = cfg.replace(vocab_size=cfg.vocab_size + n_new)

    def grow(table: Any, axis: int) -> Any:
        xp = jnp if isinstance(table, jax.Array) else np
        rows = lambda lo, hi: xp.take(table, xp.arange(lo, hi), axis=axis)  # noqa: E731
        real = rows(0, cfg.vocab_size)  # drops any earlier padding
        used = real if reset is None else rows(0, reset)
        mean = xp.mean(used.astype(xp.float32), axis=axis, keepdims=True)
        if reset is not None:
            real = xp.concatenate([used, mean.astype(real.dtype), rows(reset + 1, cfg.vocab_size)], axis=axis)
        return grow_table(real, mean, n_new, grown.padded_vocab_size - grown.vocab_size, axis, xp)

    return _map_token_tables(params, cfg, grow), grown


def add_tokens(params: Params, cfg: LlamaConfig, n_new: int = 1) -> tuple[Params, LlamaConfig]:
    """Append `n_new` vocabulary entries (NoteLLM's [EMB]) without changing any existing token's logit.

    New input-embedding rows are the mean of the existing rows. An untied head gets new columns equal to
    the mean of the existing columns, so a new token's logit is the mean of the old logits, exactly as
    for a tied head (whose output row is the new embedding row): the logits of existing tokens, and so
    the softmax restricted to the old vocabulary, are unchanged, and the new token starts improbable.
    The same arithmetic runs per slice when a checkpoint is loaded sharded (`weights.lazy.VocabGrown`).
    """
    if n_new < 1:
        raise ValueError(f"n_new must be >= 1, got {n_new}")
    return grow_vocab(params, cfg, n_new)


def init_unused_token(params: Params, cfg: LlamaConfig, token_id: int) -> Params:
    """Give an existing but unused row `token_id` (an embedding table padded beyond its tokenizer, as
    Qwen's: 151,936 rows for 151,665 tokens) the value `add_tokens` gives a new token: the mean of the
    rows [0, token_id), and an untied head column the mean of those columns. Only that token's logit
    changes. (Such a table's extra rows are real checkpoint rows, not `vocab_pad_multiple` padding.)"""
    if not 0 < token_id < cfg.vocab_size:
        raise ValueError(f"token id {token_id} is not an existing row of the {cfg.vocab_size}-row table")
    return grow_vocab(params, cfg, reset=token_id)[0]


def _map_token_tables(params: Params, cfg: LlamaConfig, fn: Callable[[Any, int], Any]) -> Params:
    """`fn(table, token_axis)` applied to the input embedding and, if untied, the head kernel."""
    params = dict(params)
    params["embed_tokens"] = {"embedding": fn(params["embed_tokens"]["embedding"], 0)}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": fn(params["lm_head"]["kernel"], 1)}
    return params


# ----------------------------------------------------------------------------------------------------
# Partial training: the embedding table and the bottom layers frozen (or every base weight, with LoRA)


def _host_transpose(table: Any) -> np.ndarray:
    return np.array(np.asarray(table).T)


def untie_head(decoder: dict, cfg: LlamaConfig, transpose=_host_transpose) -> tuple[dict, LlamaConfig]:
    """A tied model made untied: `lm_head/kernel` = a copy of the embedding table's rows (same logits).

    Used under partial training (train_top_layers, LoRA), where the embedding table is frozen: tied, the
    head would be frozen with it and CSFT could not learn. A trainable untied copy is chosen over training
    the tied rows with the input side held fixed because the frozen bottom's features (and their cache)
    depend on the input table: they stay valid only if that table never moves, which needs two copies
    anyway. Exports then carry an untied head (tie_word_embeddings false), which HF loads as is.
    `transpose` makes the copy: numpy on the host by default, or a lazy view (`weights.lazy.Transposed`).
    """
    if not cfg.tie_word_embeddings:
        return decoder, cfg
    table = decoder["embed_tokens"]["embedding"]
    return {**decoder, "lm_head": {"kernel": transpose(table)}}, cfg.replace(tie_word_embeddings=False)


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
