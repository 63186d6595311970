"""The attention core, behind one switch (`model.attention`), after q, k, v and the boolean mask exist.

- "einsum": the reference. QK product accumulated in float32 (`preferred_element_type`) with 1/sqrt(d)
  folded into q, float32 softmax, PV product in the compute dtype.
- "dot_product": `jax.nn.dot_product_attention`. On a GPU with bf16/fp16 inputs it asks for cuDNN's fused
  flash attention (`implementation="cudnn"`, the boolean mask becomes cuDNN's additive bias); where cuDNN
  refuses the shapes at trace time, and on every other backend, it runs JAX's XLA implementation (float32
  logits and softmax as well).
- "splash": Pallas splash attention (MaxText's TPU `attention=flash`): a causal block-sparse kernel with
  padding expressed as segment ids (real tokens 1, pads 0), vmapped over batch and KV heads with the
  GQA groups as the MQA kernel's heads. On a backend other than TPU it runs in Pallas interpret mode
  (tests). It needs self-attention without a cache and a length that is a multiple of 128; calls that are
  not (the decode cache) use "dot_product". The kernel sees only causal + padding, so configs with a
  sliding window (Mistral, Gemma) or attention-logit soft-capping (Gemma 2) refuse it (`LlamaConfig`).

Scores are scaled by `scale` (1/sqrt(head_dim) unless a config's `query_pre_attn_scalar` says otherwise);
attention-logit soft-capping (Gemma 2) exists in "einsum" only (`dot_product` refuses it).

q: [B, T, H, D] (RoPE applied), k and v: [B, S, K, D]; allowed: [B, T, S] bool; key_mask: [B, S] (1 = real
token). Every implementation returns [B, T, H, D] in the compute dtype. Rows whose keys are all masked
(queries at leading pads) are finite everywhere; their values are never read.
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from notellm_jax.model.precision import Precision
from notellm_jax.model.splash import splash_attention

IMPLEMENTATIONS = ("einsum", "dot_product", "splash")
SPLASH_BLOCK = 128  # splash tiles the sequence into blocks of this many tokens (BlockSizes minimum)

logger = logging.getLogger(__name__)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, key_mask: jax.Array, *,
           implementation: str, precision: Precision, scale: float | None = None,
           softcap: float | None = None) -> jax.Array:
    """scale: of the scores (default 1/sqrt(head_dim)); softcap (einsum only): scores -> c tanh(scores / c)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention {implementation!r} not in {IMPLEMENTATIONS}")
    if softcap is not None and implementation != "einsum":
        raise ValueError(f"attention {implementation!r} has no logit soft-capping: use 'einsum'")
    # Fold the scale into q (in float32, then one rounding) instead of scaling the [.., T, S] scores.
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q = (q.astype(jnp.float32) * scale).astype(precision.compute)
    k, v = k.astype(precision.compute), v.astype(precision.compute)
    if implementation == "splash" and not splash_applies(q.shape[1], k.shape[1]):
        implementation = "dot_product"
    if implementation == "einsum":
        return _einsum(q, k, v, allowed, precision, softcap)
    if implementation == "dot_product":
        return _dot_product(q, k, v, allowed)
    return _splash(q, k, v, key_mask)


def splash_applies(query_length: int, key_length: int) -> bool:
    return query_length == key_length and query_length % SPLASH_BLOCK == 0


def _einsum(q, k, v, allowed, precision: Precision, softcap: float | None = None):
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    if softcap is not None:  # Gemma 2
        scores = jnp.tanh(scores / softcap) * softcap
    # A large finite negative keeps fully masked rows (leading pads) NaN-free.
    scores = jnp.where(allowed[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min / 2)
    probs = jax.nn.softmax(scores, axis=-1).astype(precision.compute)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, d)


def _dot_product(q, k, v, allowed):
    mask = allowed[:, None, :, :]  # broadcast over heads
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0, implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError) as err:  # shapes / versions cuDNN refuses
            _log_once(f"cuDNN attention unavailable for q {q.shape} {q.dtype} ({err}); using XLA's")
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0, implementation="xla")


@functools.cache
def _log_once(message: str) -> None:
    logger.warning(message)


def _splash(q, k, v, key_mask):
    """Splash under shard_map over the context mesh (model/splash.py)."""
    return splash_attention(q, k, v, key_mask).astype(q.dtype)
