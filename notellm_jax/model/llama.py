"""The project's own Flax (Linen) LLaMA decoder.

Covers LLaMA-2 7B/13B/70B (grouped-query attention for 70B) and the small LLaMA-family models we load
here (stories260K, SmolLM2): RMSNorm, RoPE in the Hugging Face rotate-half layout with configurable
theta, SwiGLU MLP, tied or untied output head, causal attention with padding (positions come from the
attention mask, so left and right padding both work), and a functional KV cache for decoding.

Every parameter is created with logical axis names (see `notellm_jax.sharding.LOGICAL_RULES`), so the
parallelism of a run is configuration only. Layers can be scanned (`scan_layers`, fast compiles for
deep models) and rematerialised (`remat_policy`).

Parameter tree (unscanned; x = hidden, h = heads, k = kv heads, d = head_dim, m = mlp, v = vocab):
    embed_tokens/embedding [v, x]; layers_{i}/{input_norm,post_attn_norm}/scale [x];
    layers_{i}/attn/{q,k,v}_proj/kernel [x, h|k, d]; layers_{i}/attn/o_proj/kernel [h, d, x];
    layers_{i}/mlp/{gate,up}_proj/kernel [x, m]; layers_{i}/mlp/down_proj/kernel [m, x];
    norm/scale [x]; lm_head/kernel [x, v] (untied only).
With `scan_layers` the layers form one subtree `layers/...` with a leading [num_layers] axis.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Array = jax.Array

# Fields of a Hugging Face LlamaConfig we read; any other non-default architectural field is refused.
_HF_FIELDS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_hidden_layers", "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads", "head_dim": "head_dim", "rope_theta": "rope_theta",
    "rms_norm_eps": "rms_norm_eps", "max_position_embeddings": "max_position_embeddings",
    "tie_word_embeddings": "tie_word_embeddings", "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
}
# HF fields that change the architecture, with the only value this port implements.
_HF_REQUIRED = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "rope_scaling": None,
                "pretraining_tp": 1, "model_type": "llama"}

REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    # Runtime choices, not part of the checkpoint.
    compute_dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"
    # Embedding and head tables get padded_vocab_size entries (HF's pad_to_multiple_of): an odd vocabulary
    # (32,001 with [EMB]) would otherwise not shard over `tensor`. Padded rows are zero, their logits masked.
    vocab_pad_multiple: int = 1

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                                 f"num_attention_heads {self.num_attention_heads}; give head_dim")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r} not in {REMAT_POLICIES}")

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.vocab_pad_multiple) * self.vocab_pad_multiple

    @property
    def dtype(self):
        return jnp.dtype(self.compute_dtype)

    def num_params(self) -> int:
        x, m, v, d = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        attn = x * d * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        layer = attn + 3 * x * m + 2 * x
        head = 0 if self.tie_word_embeddings else x * v
        return v * x + self.num_hidden_layers * layer + x + head

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **runtime) -> "LlamaConfig":
        """Build from a Hugging Face config.json dict; refuses fields that would change the model."""
        for key, expected in _HF_REQUIRED.items():
            if key in hf and hf[key] != expected and not (key == "rope_scaling" and not hf[key]):
                raise ValueError(f"unsupported config field {key}={hf[key]!r} (this LLaMA port implements "
                                 f"{key}={expected!r})")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in hf]
        if missing:
            raise ValueError(f"config is missing required fields: {', '.join(missing)}")
        kwargs = {ours: hf[theirs] for theirs, ours in _HF_FIELDS.items() if hf.get(theirs) is not None}
        kwargs.setdefault("num_key_value_heads", hf["num_attention_heads"])
        eos = kwargs.get("eos_token_id")
        if isinstance(eos, list):
            kwargs["eos_token_id"] = eos[0]
        return cls(**kwargs, **runtime)

    def to_hf_dict(self) -> dict[str, Any]:
        out = {theirs: getattr(self, ours) for theirs, ours in _HF_FIELDS.items()}
        out.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                   attention_bias=False, mlp_bias=False, rope_scaling=None, initializer_range=0.02,
                   torch_dtype="float32", use_cache=True)
        return out


# Architecture presets (public shapes). Vocab sizes are the base models'; NoteLLM adds [EMB] on load.
PRESETS: dict[str, dict[str, Any]] = {
    "llama2_7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "llama2_13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096),
    "llama2_70b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096),
    "smollm2_135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                         tie_word_embeddings=True, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2),
    "stories260k": dict(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=5,
                        num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True,
                        max_position_embeddings=512),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
}


def preset(name: str, **overrides) -> LlamaConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return LlamaConfig(**{**PRESETS[name], **overrides})


def _dense_init(axes: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), axes)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # HF order: normalise in float32, cast back to the compute dtype, then scale.
        return normed.astype(self.dtype) * scale.astype(self.dtype)


def positions_from_mask(attention_mask: Array) -> Array:
    """Position of every token = number of real tokens before it (pads get 0); works for left/right padding."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


def apply_rope(x: Array, positions: Array, theta: float) -> Array:
    """Rotary embedding, Hugging Face rotate-half layout. x: [B, T, H, D], positions: [B, T]."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (np.arange(0, half, dtype=np.float32) * 2.0 / x.shape[-1]))
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

    @nn.compact
    def __call__(self, x: Array) -> Array:
        shape = x.shape[x.ndim - self.contract:] + tuple(self.features)
        kernel = self.param("kernel", _dense_init(self.axes), shape, self.param_dtype)
        dims = ((tuple(range(x.ndim - self.contract, x.ndim)), tuple(range(self.contract))), ((), ()))
        return jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), dims)


class Attention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x: Array, positions: Array, key_mask: Array, query_slots: Array,
                 cache: dict[str, Array] | None) -> tuple[Array, dict[str, Array] | None]:
        """cache: this layer's {"k", "v"} [B, S, kv_heads, head_dim]; new entries go to the query slots."""
        cfg = self.config
        h, k, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        dense = lambda feats, axes, name, contract=1: Projection(  # noqa: E731
            feats, axes, contract, cfg.dtype, jnp.dtype(cfg.param_dtype), name=name)
        q = dense((h, d), ("embed", "heads", "head_dim"), "q_proj")(x)
        key = dense((k, d), ("embed", "kv_heads", "head_dim"), "k_proj")(x)
        value = dense((k, d), ("embed", "kv_heads", "head_dim"), "v_proj")(x)
        q = apply_rope(q, positions, cfg.rope_theta)
        key = apply_rope(key, positions, cfg.rope_theta)

        if cache is not None:
            start = query_slots[0, 0]
            key = jax.lax.dynamic_update_slice_in_dim(cache["k"], key.astype(cache["k"].dtype), start, axis=1)
            value = jax.lax.dynamic_update_slice_in_dim(cache["v"], value.astype(cache["v"].dtype), start, axis=1)
            cache = {"k": key, "v": value}
        key_slots = jnp.arange(key.shape[1])
        # [B, Tq, S]: causal over slots, and only real (unpadded) keys.
        allowed = (key_slots[None, None, :] <= query_slots[:, :, None]) & (key_mask[:, None, :] > 0)

        b, t = q.shape[:2]
        q = q.reshape(b, t, k, h // k, d)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, key.astype(q.dtype)).astype(jnp.float32) / np.sqrt(d)
        # A large finite negative keeps fully masked rows (leading pads) NaN-free.
        scores = jnp.where(allowed[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min / 2)
        probs = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, value.astype(cfg.dtype)).reshape(b, t, h, d)
        out = dense((cfg.hidden_size,), ("heads", "head_dim", "embed"), "o_proj", contract=2)(out)
        return out, cache


class MLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        dense = lambda feats, axes, name: nn.Dense(  # noqa: E731
            feats, use_bias=False, dtype=cfg.dtype, param_dtype=jnp.dtype(cfg.param_dtype),
            kernel_init=_dense_init(axes), name=name)
        gate = dense(cfg.intermediate_size, ("embed", "mlp"), "gate_proj")(x)
        up = dense(cfg.intermediate_size, ("embed", "mlp"), "up_proj")(x)
        hidden = nn.with_logical_constraint(nn.silu(gate) * up, ("act_batch", "act_length", "act_mlp"))
        return dense(cfg.hidden_size, ("mlp", "embed"), "down_proj")(hidden)


class DecoderLayer(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x: Array, positions: Array, key_mask: Array, query_slots: Array,
                 cache: dict[str, Array] | None = None):
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.dtype, jnp.dtype(cfg.param_dtype), name=name)  # noqa: E731
        attn_out, cache = Attention(cfg, name="attn")(norm("input_norm")(x), positions, key_mask, query_slots, cache)
        x = x + attn_out
        x = x + MLP(cfg, name="mlp")(norm("post_attn_norm")(x))
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
    def __call__(self, x, layer_cache, positions, key_mask, query_slots):
        layer = _remat(DecoderLayer, self.config.remat_policy, scanned=True)(self.config, name="layer")
        x, layer_cache = layer(x, positions, key_mask, query_slots, layer_cache)
        return x, layer_cache


class Llama(nn.Module):
    """Decoder-only LLaMA. `__call__` returns hidden states after the final norm; `logits` is the head."""
    config: LlamaConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(
            cfg.padded_vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=jnp.dtype(cfg.param_dtype),
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), ("vocab", "embed")))
        if cfg.scan_layers:
            self.layers = nn.scan(
                _ScanBody, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_hidden_layers,
                metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
        else:
            layer_cls = _remat(DecoderLayer, cfg.remat_policy, scanned=False)
            self.layers = [layer_cls(cfg) for _ in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, cfg.dtype, jnp.dtype(cfg.param_dtype))
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(cfg.padded_vocab_size, use_bias=False, dtype=cfg.dtype,
                                    param_dtype=jnp.dtype(cfg.param_dtype), kernel_init=_dense_init(("embed", "vocab")))

    def __call__(self, input_ids: Array | None = None, attention_mask: Array | None = None, *,
                 inputs_embeds: Array | None = None, positions: Array | None = None,
                 cache: dict[str, Array] | None = None, first_layer: int = 0, last_layer: int | None = None,
                 final_norm: bool = True):
        """Run layers [first_layer, last_layer) and (optionally) the final norm.

        input_ids/inputs_embeds: [B, T] token ids or [B, T, H] hidden states (e.g. the output of frozen
        lower layers). attention_mask: [B, T], 1 for real tokens. With `cache` (see `init_cache`) the T new
        tokens are appended at cache["index"] and `(hidden, new_cache)` is returned.
        """
        cfg = self.config
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds.astype(cfg.dtype)
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
        new_k, new_v = [], []
        if cfg.scan_layers:
            if (first_layer, last) != (0, cfg.num_hidden_layers):
                raise ValueError("running a slice of the layers needs scan_layers=False")
            layer_cache = None if cache is None else {"k": cache["k"], "v": cache["v"]}
            x, layer_cache = self.layers(x, layer_cache, positions, key_mask, query_slots)
            if cache is not None:
                new_k, new_v = layer_cache["k"], layer_cache["v"]
        else:
            for i in range(first_layer, last):
                layer_cache = None if cache is None else {"k": cache["k"][i], "v": cache["v"][i]}
                x, layer_cache = self.layers[i](x, positions, key_mask, query_slots, layer_cache)
                if cache is not None:
                    new_k.append(layer_cache["k"])
                    new_v.append(layer_cache["v"])
        if final_norm:
            x = self.norm(x)
        if cache is None:
            return x
        stack = (lambda xs: xs) if cfg.scan_layers else jnp.stack
        return x, {"k": stack(new_k), "v": stack(new_v), "mask": key_mask, "index": cache["index"] + t}

    def init_all(self, input_ids: Array) -> Array:
        """Touches every parameter (the head too) so `init(..., method=Llama.init_all)` creates them all."""
        return self.logits(self(input_ids))

    def logits(self, hidden: Array) -> Array:
        """The LM head, for any [..., H] hidden states (apply it only where logits are needed). Entries of
        the vocabulary padding get the lowest finite logit, so no loss or decoding ever picks them."""
        cfg = self.config
        if cfg.tie_word_embeddings:
            logits = self.embed_tokens.attend(hidden.astype(cfg.dtype))
        else:
            logits = self.lm_head(hidden)
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
