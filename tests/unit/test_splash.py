"""Splash attention under shard_map (model/splash.py): on 8 fake CPU devices (Pallas interpret mode) it equals a
numpy softmax over the allowed keys, with GQA, left padding, a length that is not a multiple of 128 and a
sliding window; for a TPU topology (libtpu, no TPU) it compiles through Mosaic with no collective."""
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from notellm_jax import sharding as shd
from notellm_jax.config import MeshConfig
from notellm_jax.model.splash import splash_attention
from notellm_jax.tools import tpu_plan


def reference(q, k, v, key_mask, window):
    """softmax(q k^T) v over keys that are real, not in the future and fewer than `window` positions back."""
    b, t, h, d = q.shape
    groups = h // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q, k)
    ts, ss = np.arange(t)[:, None], np.arange(t)[None, :]
    allowed = (ss <= ts) & (ts - ss < window) & (key_mask[:, None, None, :] > 0)
    scores = np.where(allowed, scores, -1e30)  # finite: rows of pad queries stay NaN-free
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bhts,bshd->bthd", probs / probs.sum(-1, keepdims=True), v)


def test_splash_on_a_mesh_equals_the_windowed_causal_reference():
    b, t, h, kv, d, window = 8, 160, 4, 2, 32, 48
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((b, t, n, d)).astype(np.float32) for n in (h, kv, kv))
    lengths = rng.integers(20, t + 1, size=b)
    key_mask = (np.arange(t)[None, :] >= (t - lengths)[:, None]).astype(np.int32)  # left padding
    mesh = shd.make_mesh(data=1, fsdp=4, tensor=2)
    rows = NamedSharding(mesh, P(("data", "fsdp")))

    @jax.jit
    def run(q, k, v, m):
        with shd.axis_rules(mesh):
            return splash_attention(q, k, v, m, window=window)

    out = np.asarray(run(*(jax.device_put(x, rows) for x in (q, k, v, key_mask))))
    want = reference(q, k, v, key_mask, window)
    real = key_mask[:, :, None, None].astype(bool)  # queries at pads are never read
    np.testing.assert_allclose(np.where(real, out, 0), np.where(real, want, 0), atol=2e-5)


def test_splash_compiles_through_mosaic_for_a_tpu_topology_without_collectives():
    if tpu_plan.libtpu_version() is None:
        pytest.skip("libtpu not installed (requirements-dev.txt: jax[tpu])")
    found = tpu_plan.splash_lowering("v5p-8", MeshConfig(fsdp=2, tensor=2), batch=4, length=192, heads=8,
                                     kv_heads=2, window=64)
    assert found["lowered"] and found["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    assert found["mosaic_kernels"] >= 3  # forward, dq and dkv kernels
    assert found["collectives"] == {}  # each device attends over its own rows and heads
