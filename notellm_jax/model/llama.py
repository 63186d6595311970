"""The project's own Flax (Linen) LLaMA-family decoder.

Covers LLaMA-2 7B/13B/70B, LLaMA-3.1/3.2, Qwen2/2.5, Qwen3, Mistral and the small LLaMA-family models we
load here (stories260K, SmolLM2): RMSNorm, RoPE in the Hugging Face rotate-half layout with configurable
theta and optional LLaMA-3 frequency scaling, SwiGLU MLP, tied or untied output head, optional q/k/v and
o projection biases (Qwen2, `attention_bias`), optional per-head q/k RMSNorm (Qwen3), causal attention
with padding (positions come from the attention mask, so left and right padding both work) and an
optional sliding window (Mistral), and a functional KV cache for decoding. The configurations (`LlamaConfig`,
the families, the presets and the Hugging Face config.json tables) are in `notellm_jax.model.families`;
their fields say which of these features a model uses, so the decoder itself has no per-family code.

Every parameter is created with logical axis names (see `notellm_jax.sharding.LOGICAL_RULES`), so the
parallelism of a run is configuration only. Layers can be scanned (`scan_layers`, fast compiles for
deep models) and rematerialised (`remat_policy`).

Parameter tree (unscanned; x = hidden, h = heads, k = kv heads, d = head_dim, m = mlp, v = vocab):
    embed_tokens/embedding [v, x]; layers_{i}/{input_norm,post_attn_norm}/scale [x];
    layers_{i}/attn/{q,k,v}_proj/kernel [x, h|k, d]; layers_{i}/attn/o_proj/kernel [h, d, x];
    layers_{i}/attn/{q,k,v}_proj/bias [h|k, d], o_proj/bias [x] (with attention_bias / attention_out_bias);
    layers_{i}/attn/{q,k}_norm/scale [d] (qk_norm);
    layers_{i}/mlp/{gate,up}_proj/kernel [x, m]; layers_{i}/mlp/down_proj/kernel [m, x];
    norm/scale [x]; lm_head/kernel [x, v] (untied only).
With `scan_layers` the layers form one subtree `layers/...` with a leading [num_layers] axis.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from notellm_jax.model.attention import attend
from notellm_jax.model.families import LlamaConfig
from notellm_jax.model.precision import Precision

Array = jax.Array


def _dense_init(axes: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), axes)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis (the hidden size, or head_dim for the per-head q/k norms). With
    `unit_offset` (Gemma) the stored scale s multiplies as (1 + s) and starts at zero."""
    eps: float
    dtype: Any
    param_dtype: Any
    axis_name: str = "norm"
    unit_offset: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.zeros if self.unit_offset else nn.initializers.ones
        scale = self.param("scale", nn.with_logical_partitioning(init, (self.axis_name,)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.unit_offset:  # HF Gemma order: scale in float32, then cast to the compute dtype
            return (normed * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)
        # HF LLaMA order: normalise in float32, cast back to the compute dtype, then scale.
        return normed.astype(self.dtype) * scale.astype(self.dtype)


def make_norm(cfg: LlamaConfig, name: str, axis_name: str = "norm") -> RMSNorm:
    return RMSNorm(cfg.rms_norm_eps, cfg.dtype, jnp.dtype(cfg.param_dtype), axis_name, cfg.norm_unit_offset,
                   name=name)


def take_rows(a: Array, index: Array) -> Array:
    """[B, T, ...] -> [B, P, ...]: each row's entries at `index` [B, P] along the sequence axis."""
    return jnp.take_along_axis(a, index.reshape(index.shape + (1,) * (a.ndim - 2)), axis=1)


def positions_from_mask(attention_mask: Array) -> Array:
    """Position of every token = number of real tokens before it (pads get 0); works for left/right padding."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


def rope_frequencies(cfg: LlamaConfig) -> np.ndarray:
    """The [head_dim / 2] float32 inverse frequencies of RoPE, as transformers computes them.

    `linear`: every frequency divided by `factor`. `llama3` (LLaMA-3.1/3.2): wavelengths shorter than
    original_max_position / high_freq_factor are kept, those longer than original_max_position / low_freq_factor are divided by `factor`, and the band in
    between is interpolated smoothly (transformers' `_compute_llama3_parameters`; attention factor 1).
    """
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim // 2, dtype=np.float32) * 2.0 / cfg.head_dim))
    if cfg.rope_type == "default":
        return inv_freq
    if cfg.rope_type == "linear":
        return (inv_freq / np.float32(cfg.rope_factor)).astype(np.float32)
    factor, low, high = (np.float32(f) for f in (cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor))
    context = np.float32(cfg.rope_original_max_position)
    wavelen = np.float32(2 * np.pi) / inv_freq
    scaled = np.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
    """Rotary embedding, Hugging Face rotate-half layout. x: [B, T, H, D], positions: [B, T]."""
    half = x.shape[-1] // 2
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, half]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


class Projection(nn.Module):
    """x[..., *in] @ kernel[*in, *out] with a logically partitioned N-d kernel.

    (flax's DenseGeneral initialises a flat 2-d kernel and reshapes it, which breaks N-d logical
    partitioning once axis rules are active.)
    """
    features: tuple[int, ...]
    axes: tuple[str, ...]
    contract: int
    dtype: Any
    param_dtype: Any
    use_bias: bool = False
    precision: Precision | None = None  # given: logits, accumulated and returned in its output dtype

    @nn.compact
    def __call__(self, x: Array) -> Array:
        shape = x.shape[x.ndim - self.contract:] + tuple(self.features)
        kernel = self.param("kernel", _dense_init(self.axes), shape, self.param_dtype)
        dims = ((tuple(range(x.ndim - self.contract, x.ndim)), tuple(range(self.contract))), ((), ()))
        if self.precision is not None:
            return self.precision.logits(x, kernel, dims)
        out = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), dims)
        if self.use_bias:
            out_axes = self.axes[len(self.axes) - len(self.features):]
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, out_axes),
                              tuple(self.features), self.param_dtype)
            out = out + bias.astype(self.dtype)
        return out


class Attention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x: Array, positions: Array, key_mask: Array, query_slots: Array,
                 cache: dict[str, Array] | None, query_index: Array | None = None, local: Array | bool = True,
                 prefix_end: Array | None = None) -> tuple[Array, dict[str, Array] | None]:
        """cache: this layer's {"k", "v"} [B, S, kv_heads, head_dim]; new entries go to the query slots.

        query_index [B, P] (no cache): queries only at these positions of x (keys and values at all of
        them), so the output is [B, P, hidden]: the rows of the full output at those positions.
        local: whether this layer is a sliding-window one (a traced scalar under scan, so no branch).
        prefix_end [B]: slots below it attend to each other in both directions (`attention_allowed`)."""
        cfg = self.config
        h, k, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        dense = lambda feats, axes, name, contract=1, bias=cfg.attention_bias: Projection(  # noqa: E731
            feats, axes, contract, cfg.dtype, jnp.dtype(cfg.param_dtype), bias, name=name)
        key_positions, x_query = positions, x
        if query_index is not None:  # Llama.__call__ refuses it with a cache
            x_query, positions, query_slots = (take_rows(a, query_index) for a in (x, positions, query_slots))
        q = dense((h, d), ("embed", "heads", "head_dim"), "q_proj")(x_query)
        key = dense((k, d), ("embed", "kv_heads", "head_dim"), "k_proj")(x)
        value = dense((k, d), ("embed", "kv_heads", "head_dim"), "v_proj")(x)
        if cfg.qk_norm:  # Qwen3, Gemma 3: RMSNorm over head_dim of every q and k head, before RoPE
            q, key = make_norm(cfg, "q_norm", "head_dim")(q), make_norm(cfg, "k_norm", "head_dim")(key)
        inv_freq = rope_frequencies(cfg)
        if cfg.rope_local_theta is not None:  # Gemma 3: sliding layers' own base, unscaled
            local_freq = rope_frequencies(cfg.replace(rope_theta=cfg.rope_local_theta, rope_type="default"))
            inv_freq = jnp.where(local, local_freq, inv_freq)
        q = apply_rope(q, positions, inv_freq)
        key = apply_rope(key, key_positions, inv_freq)

        if cache is not None:
            start = query_slots[0, 0]
            key = jax.lax.dynamic_update_slice_in_dim(cache["k"], key.astype(cache["k"].dtype), start, axis=1)
            value = jax.lax.dynamic_update_slice_in_dim(cache["v"], value.astype(cache["v"].dtype), start, axis=1)
            cache = {"k": key, "v": value}
        allowed = attention_allowed(query_slots, key.shape[1], key_mask, prefix_end)
        if cfg.sliding_window is not None and cfg.sliding_window < key.shape[1]:
            # Sliding layers (Mistral: all; Gemma: `layer_types`): only the last `sliding_window` positions
            # (the query's own included), counted in positions, not cache slots, so pads between a right-
            # padded prompt and its continuation do not shrink the window. A window no shorter than the keys
            # is plain causal attention.
            if cache is not None:
                key_positions = positions_from_mask(key_mask)
            allowed &= (positions[:, :, None] - key_positions[:, None, :] < cfg.sliding_window) | ~jnp.asarray(local)

        # The splash kernel expresses causal masks only: a bidirectional prefix takes the dense path.
        implementation = "dot_product" if prefix_end is not None and cfg.attention == "splash" else cfg.attention
        out = attend(q, key, value, allowed, key_mask, implementation=implementation, precision=cfg.precision,
                     scale=cfg.attention_scale, softcap=cfg.attn_logit_softcapping)
        out = dense((cfg.hidden_size,), ("heads", "head_dim", "embed"), "o_proj", 2, cfg.attention_out_bias)(out)
        return out, cache


def attention_allowed(query_slots: Array, key_length: int, key_mask: Array, prefix_end: Array | None = None) -> Array:
    """[B, Tq, S] bool: causal over slots, only real (unpadded) keys. With `prefix_end` [B] (prefix-bidirectional
    attention, `model.prefix_bidirectional`): a query in a slot below its row's prefix_end also sees every key
    below it, so the prefix attends in both directions while later tokens stay causal (they see the whole
    prefix either way) and nothing at or after prefix_end reaches a prefix token."""
    key_slots = jnp.arange(key_length)[None, None, :]
    allowed = key_slots <= query_slots[:, :, None]
    if prefix_end is not None:
        end = prefix_end.astype(jnp.int32)[:, None, None]
        allowed |= (query_slots[:, :, None] < end) & (key_slots < end)
    return allowed & (key_mask[:, None, :] > 0)


class MLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        dense = lambda feats, axes, name: nn.Dense(  # noqa: E731
            feats, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.precision.param,
            kernel_init=_dense_init(axes), name=name)
        gate = dense(cfg.intermediate_size, ("embed", "mlp"), "gate_proj")(x)
        up = dense(cfg.intermediate_size, ("embed", "mlp"), "up_proj")(x)
        act = nn.silu if cfg.hidden_act == "silu" else functools.partial(nn.gelu, approximate=True)
        hidden = nn.with_logical_constraint(act(gate) * up, ("act_batch", "act_length", "act_mlp"))
        return dense(cfg.hidden_size, ("mlp", "embed"), "down_proj")(hidden)


class DecoderLayer(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x: Array, positions: Array, key_mask: Array, query_slots: Array,
                 cache: dict[str, Array] | None = None, query_index: Array | None = None,
                 local: Array | bool = True, prefix_end: Array | None = None):
        """query_index [B, P]: the layer's output only at those positions ([B, P, hidden]; see Attention).
        With `sandwich_norms` (Gemma) the attention and MLP outputs are normalised too (post_attn_norm,
        post_mlp_norm) and pre_mlp_norm feeds the MLP; otherwise post_attn_norm feeds the MLP (HF's names).
        prefix_end [B]: the bidirectional prefix of each row (see `attention_allowed`)."""
        cfg = self.config
        norm = lambda name: make_norm(cfg, name)  # noqa: E731
        attn_out, cache = Attention(cfg, name="attn")(norm("input_norm")(x), positions, key_mask, query_slots, cache,
                                                      query_index, local, prefix_end)
        if query_index is not None:
            x = take_rows(x, query_index)
        if cfg.sandwich_norms:
            attn_out = norm("post_attn_norm")(attn_out)
        x = x + attn_out
        mlp_out = MLP(cfg, name="mlp")(norm("pre_mlp_norm" if cfg.sandwich_norms else "post_attn_norm")(x))
        x = x + (norm("post_mlp_norm")(mlp_out) if cfg.sandwich_norms else mlp_out)
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        return x, cache


def _remat(layer_cls, policy: str, scanned: bool):
    if policy == "none":
        return layer_cls
    policies = {"full": None,
                "dots_saveable": jax.checkpoint_policies.dots_saveable,
                "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
    return nn.remat(layer_cls, policy=policies[policy], prevent_cse=not scanned)


class _ScanBody(nn.Module):
    """Adapts DecoderLayer to nn.scan: carry = hidden, per-layer input = cache slice."""
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, layer_cache, local, positions, key_mask, query_slots, prefix_end):
        layer = _remat(DecoderLayer, self.config.remat_policy, scanned=True)(self.config, name="layer")
        x, layer_cache = layer(x, positions, key_mask, query_slots, layer_cache, None, local, prefix_end)
        return x, layer_cache


class Llama(nn.Module):
    """Decoder-only LLaMA. `__call__` returns hidden states after the final norm; `logits` is the head."""
    config: LlamaConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(
            cfg.padded_vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.precision.param,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), ("vocab", "embed")))
        if cfg.scan_layers:
            self.layers = nn.scan(
                _ScanBody, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(0, 0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_hidden_layers,
                metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
        else:
            layer_cls = _remat(DecoderLayer, cfg.remat_policy, scanned=False)
            self.layers = [layer_cls(cfg) for _ in range(cfg.num_hidden_layers)]
        self.norm = make_norm(cfg, "norm")
        if not cfg.tie_word_embeddings:
            self.lm_head = Projection((cfg.padded_vocab_size,), ("embed", "vocab"), 1, cfg.dtype, cfg.precision.param,
                                      precision=cfg.precision)

    def __call__(self, input_ids: Array | None = None, attention_mask: Array | None = None, *,
                 inputs_embeds: Array | None = None, positions: Array | None = None,
                 cache: dict[str, Array] | None = None, first_layer: int = 0, last_layer: int | None = None,
                 final_norm: bool = True, read_positions: Array | None = None,
                 prefix_end: Array | None = None, prefix_from_layer: int = 0):
        """Run layers [first_layer, last_layer) and (optionally) the final norm.

        input_ids/inputs_embeds: [B, T] token ids or [B, T, H] hidden states (e.g. the output of frozen
        lower layers). attention_mask: [B, T], 1 for real tokens. With `cache` (see `init_cache`) the T new
        tokens are appended at cache["index"] and `(hidden, new_cache)` is returned.
        read_positions [B, P] (no cache): return only the hidden states at these positions, [B, P, H]. The
        last layer then computes its queries, attention output and MLP at those P positions alone (its keys
        and values still at all T), which saves most of one layer's work when P << T (NoteLLM reads the
        [EMB] position and the supervised positions only). With scanned layers the rows are gathered after.
        prefix_end [B] (slots; `attention_allowed`): layers from `prefix_from_layer` on attend bidirectionally
        within each row's slots [0, prefix_end); the layers below stay causal (NoteLLM's frozen bottom).
        """
        cfg = self.config
        if inputs_embeds is None:  # Gemma: the token embeddings times sqrt(hidden), rounded like HF's
            x = self.embed_tokens(input_ids)
            if cfg.scale_embeddings:
                x = x * jnp.asarray(cfg.hidden_size ** 0.5, cfg.dtype)
        else:  # hidden states entering layer `first_layer` (never scaled)
            x = inputs_embeds.astype(cfg.dtype)
        b, t = x.shape[:2]
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        attention_mask = attention_mask.astype(jnp.int32)
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))

        if cache is None:
            key_mask = attention_mask
            query_slots = jnp.broadcast_to(jnp.arange(t), (b, t))
            if positions is None:
                positions = positions_from_mask(attention_mask)
        else:
            index = cache["index"]
            key_mask = jax.lax.dynamic_update_slice_in_dim(cache["mask"], attention_mask, index, axis=1)
            query_slots = jnp.broadcast_to(index + jnp.arange(t), (b, t))
            if positions is None:
                seen = jnp.sum(cache["mask"], axis=1, keepdims=True)
                positions = (seen + jnp.cumsum(attention_mask, axis=1) - 1).clip(min=0).astype(jnp.int32)

        last = cfg.num_hidden_layers if last_layer is None else last_layer
        if read_positions is not None:
            if cache is not None:
                raise ValueError("read_positions needs cache=None")
            read_positions = read_positions.astype(jnp.int32)
        masks = (positions, key_mask, query_slots, prefix_end, prefix_from_layer)
        x, new_k, new_v = self._layers(x, masks, cache, first_layer, last, read_positions)
        if final_norm:
            x = self.norm(x)
        if cache is None:
            return x
        stack = (lambda xs: xs) if cfg.scan_layers else jnp.stack
        return x, {"k": stack(new_k), "v": stack(new_v), "mask": key_mask, "index": cache["index"] + t}

    def _layers(self, x, masks, cache, first_layer: int, last: int, read_positions):
        """Layers [first_layer, last); the last one at `read_positions` only. Returns (x, new_k, new_v)."""
        cfg = self.config
        positions, key_mask, query_slots, prefix_end, prefix_from_layer = masks
        new_k, new_v = [], []
        local = jnp.asarray(cfg.local_layers)  # scanned data (or indexed per layer), not a Python branch
        if cfg.scan_layers:
            if (first_layer, last) != (0, cfg.num_hidden_layers):
                raise ValueError("running a slice of the layers needs scan_layers=False")
            if prefix_end is not None and prefix_from_layer > 0:
                raise ValueError("a bidirectional prefix above causal layers needs scan_layers=False")
            layer_cache = None if cache is None else {"k": cache["k"], "v": cache["v"]}
            x, layer_cache = self.layers(x, layer_cache, local, positions, key_mask, query_slots, prefix_end)
            if cache is not None:
                new_k, new_v = layer_cache["k"], layer_cache["v"]
            if read_positions is not None:
                x = take_rows(x, read_positions)
        else:
            if read_positions is not None and last <= first_layer:  # no layer to run: just the rows
                x = take_rows(x, read_positions)
            for i in range(first_layer, last):
                layer_cache = None if cache is None else {"k": cache["k"][i], "v": cache["v"][i]}
                query_index = read_positions if i == last - 1 else None
                layer_prefix = prefix_end if i >= prefix_from_layer else None
                x, layer_cache = self.layers[i](x, positions, key_mask, query_slots, layer_cache, query_index,
                                                local[i], layer_prefix)
                if cache is not None:
                    new_k.append(layer_cache["k"])
                    new_v.append(layer_cache["v"])
        return x, new_k, new_v

    def init_all(self, input_ids: Array) -> Array:
        """Touches every parameter (the head too) so `init(..., method=Llama.init_all)` creates them all."""
        return self.logits(self(input_ids))

    def logits(self, hidden: Array) -> Array:
        """The LM head, for any [..., H] hidden states (apply it only where logits are needed): float32
        logits (the precision policy's output dtype) straight out of the contraction. Entries of the
        vocabulary padding get the lowest finite logit, so no loss or decoding ever picks them."""
        cfg = self.config
        if cfg.tie_word_embeddings:
            dims = (((hidden.ndim - 1,), (1,)), ((), ()))
            logits = cfg.precision.logits(hidden, self.embed_tokens.embedding, dims)
        else:
            logits = self.lm_head(hidden)
        if cfg.final_logit_softcapping is not None:  # Gemma 2
            logits = jnp.tanh(logits / cfg.final_logit_softcapping) * cfg.final_logit_softcapping
        if cfg.padded_vocab_size == cfg.vocab_size:
            return logits
        real = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
        return jnp.where(real, logits, jnp.finfo(logits.dtype).min)


def init_cache(config: LlamaConfig, batch: int, max_length: int, dtype=None) -> dict[str, Array]:
    """An empty KV cache with `max_length` slots; pass it to `Llama.__call__(cache=...)`."""
    dtype = jnp.dtype(dtype or config.compute_dtype)
    shape = (config.num_hidden_layers, batch, max_length, config.num_key_value_heads, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "mask": jnp.zeros((batch, max_length), jnp.int32), "index": jnp.zeros((), jnp.int32)}
