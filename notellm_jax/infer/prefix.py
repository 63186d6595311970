"""The prompt-prefix key/value cache: the instruction tokens every category prompt starts with run once, and
each note's own tokens run on top of them.

Attention is causal, so the prefix's keys and values are the same for every note: `prefix_kv` computes them
once (every layer), `prefix_cache` lays them out as the decoder's cache for a [B, T] batch (prefix in slots
[0, P), the notes in [P, P + T), positions continuing from P), and `prefix_decode` runs any slice of the
layers over the notes' tokens (or hidden states) on top of it: the whole model (`encoder.prefix_apply`), or
the frozen bottom of a top-k export (`feature_cache.FeatureCache`) and then its trained top.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from notellm_jax.model.llama import init_cache


def prefix_kv(model, params: Any, prefix: Sequence[int]) -> dict[str, Any]:
    """Keys and values [layers, 1, P, kv_heads, head_dim] of the decoder over the prompt prefix, run once."""
    ids = jnp.asarray([list(prefix)], jnp.int32)
    cache = init_cache(model.llama, 1, len(prefix))
    _, cache = model.apply({"params": params}, ids, jnp.ones_like(ids), cache=cache,
                           method=lambda m, *a, **kw: m.decoder(*a, **kw))
    return {"k": cache["k"], "v": cache["v"]}


def prefix_cache(kv: dict[str, Any], rows: int, length: int) -> dict[str, Any]:
    """The decoder's cache for `rows` sequences of `length` new slots after the prefix `kv` (any layers)."""
    layers, _, p, heads, dim = kv["k"].shape

    def filled(x):
        return jnp.concatenate([jnp.broadcast_to(x, (layers, rows, p, heads, dim)),
                                jnp.zeros((layers, rows, length, heads, dim), x.dtype)], axis=2)

    return {"k": filled(kv["k"]), "v": filled(kv["v"]), "index": jnp.int32(p),
            "mask": jnp.concatenate([jnp.ones((rows, p), jnp.int32), jnp.zeros((rows, length), jnp.int32)], axis=1)}


def prefix_decode(decoder, inputs: jax.Array, attention_mask: jax.Array, kv: dict[str, Any], first_layer: int = 0,
                  last_layer: int | None = None, final_norm: bool = True) -> jax.Array:
    """[B, T, H] hidden states after layers [first_layer, last_layer) of `decoder` (a bound Llama) over
    `inputs` (token ids [B, T], or the hidden states entering `first_layer` [B, T, H]) that follow the prefix
    whose keys and values `kv` holds for every layer below `last_layer` (layer i at index i)."""
    b, t = inputs.shape[:2]
    key = "input_ids" if inputs.ndim == 2 else "inputs_embeds"
    hidden, _ = decoder(**{key: inputs}, attention_mask=attention_mask, cache=prefix_cache(kv, b, t),
                        first_layer=first_layer, last_layer=last_layer, final_norm=final_norm)
    return hidden
