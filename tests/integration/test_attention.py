"""The attention switch: every implementation equals the einsum reference, and the reference equals a float64
numpy attention, with left and right padding and grouped-query attention; the KV-cache decode equals
recomputation with each implementation.

Tolerances. fp32: 1e-5 (different summation orders only). bf16: q, k, v and the probabilities are bf16 in
every implementation and the logits float32, so implementations differ by the rounding of the PV product's
accumulation and of the probabilities: a few bf16 ulps (2^-8 relative) of outputs of order 1, hence 3e-2
absolute (a bound from that argument; the observed difference was not recorded).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from notellm_jax.model.attention import IMPLEMENTATIONS, attend
from notellm_jax.model.families import LlamaConfig
from notellm_jax.model.llama import Llama, init_cache
from notellm_jax.model.params import init_params
from notellm_jax.model.precision import Precision

# T = 128: the smallest length splash attention tiles (in Pallas interpret mode on CPU).
B, T, H, K, D = 2, 128, 4, 2, 16
FP32_TOL = 1e-5
BF16_TOL = 3e-2


def padding_mask(side: str) -> np.ndarray:
    """Row 0 unpadded, row 1 with 37 pads on `side`."""
    mask = np.ones((B, T), np.int32)
    if side == "left":
        mask[1, :37] = 0
    else:
        mask[1, T - 37:] = 0
    return mask


def causal_allowed(mask: np.ndarray) -> np.ndarray:
    slots = np.arange(T)
    return (slots[None, None, :] <= slots[None, :, None]) & (mask[:, None, :] > 0)


def numpy_attention(q, k, v, allowed) -> np.ndarray:
    """float64, one head at a time, with each query head reading KV head h // (H // K)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    out = np.zeros(q.shape)
    for b in range(B):
        for h in range(H):
            kv = h // (H // K)
            scores = q[b, :, h] @ k[b, :, kv].T / np.sqrt(D)
            scores = np.where(allowed[b], scores, -np.inf)
            real = allowed[b].any(-1)
            probs = np.zeros_like(scores)
            probs[real] = np.exp(scores[real] - scores[real].max(-1, keepdims=True))
            probs[real] /= probs[real].sum(-1, keepdims=True)
            out[b, :, h] = probs @ v[b, :, kv]
    return out


def qkv(dtype):
    rng = np.random.default_rng(0)
    shapes = [(B, T, H, D), (B, T, K, D), (B, T, K, D)]
    return [jnp.asarray(rng.normal(0, 1, s), dtype) for s in shapes]


def run(implementation: str, mask: np.ndarray, dtype: str):
    q, k, v = qkv(dtype)
    fn = jax.jit(lambda q, k, v, allowed, key_mask: attend(
        q, k, v, allowed, key_mask, implementation=implementation, precision=Precision(compute_dtype=dtype)))
    out = fn(q, k, v, jnp.asarray(causal_allowed(mask)), jnp.asarray(mask))
    assert out.dtype == jnp.dtype(dtype) and out.shape == (B, T, H, D)
    return np.asarray(out.astype(jnp.float32))


@pytest.mark.parametrize("side", ["left", "right"])
def test_einsum_reference_equals_float64_numpy(side):
    mask = padding_mask(side)
    want = numpy_attention(*qkv(jnp.float32), causal_allowed(mask))
    got = run("einsum", mask, "float32")
    real = mask > 0  # pad queries' outputs are never read
    np.testing.assert_allclose(got[real], want[real], atol=FP32_TOL, rtol=FP32_TOL)


# splash runs in Pallas interpret mode off TPU: correct but slow to trace, hence marked slow.
SPLASH_SLOW = pytest.param("splash", marks=pytest.mark.slow)


@pytest.mark.parametrize("implementation", ["dot_product", SPLASH_SLOW])
@pytest.mark.parametrize("dtype,tol", [("float32", FP32_TOL), ("bfloat16", BF16_TOL)])
@pytest.mark.parametrize("side", ["left", "right"])
def test_implementation_equals_einsum(implementation, dtype, tol, side):
    mask = padding_mask(side)
    want = run("einsum", mask, dtype)
    got = run(implementation, mask, dtype)
    real = mask > 0
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got[real], want[real], atol=tol, rtol=tol)


def tiny_llama(attention: str) -> LlamaConfig:
    """GQA (4 query heads on 2 KV heads), untied head."""
    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       attention=attention)


@pytest.mark.slow
@pytest.mark.parametrize("implementation", ["einsum", "dot_product", SPLASH_SLOW])
def test_model_forward_and_decode_cache_equal_recomputation(implementation):
    """A left-padded batch of 128-token prompts: the model's forward with `implementation` equals the einsum
    model's (splash runs its kernel here); then prefill the cache and feed 3 tokens one at a time: each
    step's hidden state equals the einsum forward over prompt + fed tokens at that position (with a cache
    splash hands over to dot_product)."""
    cfg = tiny_llama(implementation)
    params = init_params(cfg, jax.random.key(1))
    forward = jax.jit(lambda ids, mask: Llama(cfg).apply({"params": params}, ids, mask))
    reference = jax.jit(lambda ids, mask: Llama(cfg.replace(attention="einsum")).apply({"params": params}, ids, mask))
    with_cache = jax.jit(lambda ids, mask, cache: Llama(cfg).apply({"params": params}, ids, mask, cache=cache))
    rng = np.random.default_rng(2)
    prompt_len, new = 128, 3
    ids = rng.integers(0, cfg.vocab_size, (B, prompt_len + new)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :29] = 0  # left padding
    full = np.asarray(reference(ids, mask))
    real = mask[:, :prompt_len] > 0
    np.testing.assert_allclose(np.asarray(forward(ids[:, :prompt_len], mask[:, :prompt_len]))[real],
                               np.asarray(reference(ids[:, :prompt_len], mask[:, :prompt_len]))[real], atol=FP32_TOL)

    cache = init_cache(cfg, B, prompt_len + new)
    hidden, cache = with_cache(ids[:, :prompt_len], mask[:, :prompt_len], cache)
    np.testing.assert_allclose(np.asarray(hidden)[real], full[:, :prompt_len][real], atol=FP32_TOL)
    for i in range(prompt_len, prompt_len + new):
        hidden, cache = with_cache(ids[:, i:i + 1], mask[:, i:i + 1], cache)
        np.testing.assert_allclose(np.asarray(hidden[:, 0]), full[:, i], atol=FP32_TOL)


def test_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="attention 'flash'"):
        tiny_llama("flash")


def test_every_implementation_is_tested_here():
    assert set(IMPLEMENTATIONS) == {"einsum", "dot_product", "splash"}
