"""The parameter tree: random init, abstract shapes, scan stacking, [EMB] growth, the frozen/trainable split.

Host-side numpy throughout where a tree is rebuilt (stacking, growth), so a big model never lands on one
device on its way to being sharded.
"""
from __future__ import annotations

import re
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


def sharded_abstract_params(config: LlamaConfig, mesh) -> Any:
    """Unboxed ShapeDtypeStructs of the decoder parameters carrying their NamedShardings on `mesh`."""
    from notellm_jax import sharding as shd
    boxed = abstract_params(config)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.meta.unbox(boxed),
                        shd.logical_shardings(boxed, mesh))


def init_params(config: LlamaConfig, rng: jax.Array) -> Any:
    """Randomly initialised, unboxed decoder parameters (small models and tests)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return nn.meta.unbox(Llama(config).init(rng, ids, method=Llama.init_all)["params"])


def _host_stack(values) -> np.ndarray:
    return np.stack([np.asarray(v) for v in values])


def stack_layers(params: Params, stack=_host_stack) -> Params:
    """layers_{i}/... subtrees -> one `layers/layer/...` subtree with a leading layer axis (scan layout).
    `stack` joins one parameter's per-layer values: numpy on the host by default, jnp.stack inside jit,
    or a lazy stack (`weights.formats.Stacked`)."""
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


def grow_vocab(params: Params, cfg: LlamaConfig, n_new: int) -> tuple[Params, LlamaConfig]:
    """`n_new` (>= 0) mean entries appended as in `add_tokens`, then the tables zero-padded to the grown
    config's `padded_vocab_size` (numpy for host arrays, jnp for jax or traced ones)."""
    grown = cfg.replace(vocab_size=cfg.vocab_size + n_new)

    def grow(table: Any, axis: int) -> Any:
        xp = jnp if isinstance(table, jax.Array) else np
        real = xp.take(table, xp.arange(cfg.vocab_size), axis=axis)  # drops any earlier padding
        mean = xp.mean(real.astype(xp.float32), axis=axis, keepdims=True)
        return grow_table(real, mean, n_new, grown.padded_vocab_size - grown.vocab_size, axis, xp)

    params = dict(params)
    params["embed_tokens"] = {"embedding": grow(params["embed_tokens"]["embedding"], 0)}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": grow(params["lm_head"]["kernel"], 1)}
    return params, grown


def add_tokens(params: Params, cfg: LlamaConfig, n_new: int = 1) -> tuple[Params, LlamaConfig]:
    """Append `n_new` vocabulary entries (NoteLLM's [EMB]) without changing any existing token's logit.

    New input-embedding rows are the mean of the existing rows. An untied head gets new columns equal to
    the mean of the existing columns, so a new token's logit is the mean of the old logits, exactly as
    for a tied head (whose output row is the new embedding row): the logits of existing tokens, and so
    the softmax restricted to the old vocabulary, are unchanged, and the new token starts improbable.
    The same arithmetic runs per slice when a checkpoint is loaded sharded (`weights.formats.VocabGrown`).
    """
    if n_new < 1:
        raise ValueError(f"n_new must be >= 1, got {n_new}")
    return grow_vocab(params, cfg, n_new)


# ----------------------------------------------------------------------------------------------------
# Partial training: the embedding table and the bottom layers frozen


def frozen_layer_count(train_top_layers: int, cfg: LlamaConfig) -> int:
    """Decoder layers below the trained top `train_top_layers` (0 = everything trains)."""
    if train_top_layers <= 0 or train_top_layers >= cfg.num_hidden_layers:
        return 0
    if cfg.scan_layers:
        raise ValueError("model.train_top_layers needs model.scan_layers=False (frozen layers are sliced off)")
    return cfg.num_hidden_layers - train_top_layers


def _is_frozen(path: tuple[str, ...], frozen_layers: int) -> bool:
    if frozen_layers == 0 or path[0] != "decoder":
        return False
    if path[1] == "embed_tokens":
        return True
    layer = layer_number(path[1])
    return layer is not None and layer < frozen_layers


def split_params(params: Params, frozen_layers: int) -> tuple[Params, Params]:
    """(trainable, frozen): the embedding table and layers [0, frozen_layers) are frozen."""
    flat = flatten_dict(params)
    trainable = {k: v for k, v in flat.items() if not _is_frozen(k, frozen_layers)}
    frozen = {k: v for k, v in flat.items() if _is_frozen(k, frozen_layers)}
    return unflatten_dict(trainable), (unflatten_dict(frozen) if frozen else {})


def merge_params(trainable: Params, frozen: Params) -> Params:
    if not frozen:
        return trainable
    return unflatten_dict({**flatten_dict(frozen), **flatten_dict(trainable)})
