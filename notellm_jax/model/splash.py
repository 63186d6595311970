"""Splash attention (the Pallas TPU kernel MaxText runs as `attention=flash`) inside a shard_map over the mesh.

A Pallas call is opaque to the SPMD partitioner, which would gather q, k and v onto every device and run the
whole batch there; `shard_map` instead hands each device its own rows (batch over `data` x `fsdp`) and heads
(over `tensor`, when the KV heads divide), so the kernel runs on local blocks and nothing is communicated.

The kernel is the MQA one, vmapped over batch rows and KV heads with each KV head's group of query heads as
its heads (GQA). Padding is segment ids (real tokens 1, pads 0); the mask is causal, or causal within a
sliding window (Mistral: splash's LocalMask, `window` positions counting the query's own). A length that is
not a multiple of 128 (the kernel's smallest block) is padded on the right with pad tokens and cut back.
The kernel compiles through Mosaic (an HLO `tpu_custom_call`) when the mesh is made of TPU devices, a TPU
topology's included (`notellm plan --target tpu`); on other devices it runs in Pallas interpret mode.

q: [B, T, H, D] already scaled, k and v: [B, T, K, D], key_mask: [B, T] (1 = real token) -> [B, T, H, D].
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

BLOCK = 128  # the smallest block splash tiles a sequence into


@functools.cache
def splash_kernel(length: int, groups: int, window: int | None, interpret: bool):
    """The MQA splash kernel for `groups` query heads per KV head at `length` (a multiple of BLOCK)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk  # Pallas TPU: splash only
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm  # Pallas TPU: splash only

    shape = (length, length)
    one = sm.CausalMask(shape) if window is None else sm.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    block = max(b for b in (512, 256, BLOCK) if length % b == 0)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    with jax.ensure_compile_time_eval():  # concrete mask-info arrays: the kernel is cached across traces
        kernel = sk.make_splash_mqa(sm.MultiHeadMask([one] * groups), head_shards=1, q_seq_shards=1,
                                    block_sizes=sizes, interpret=interpret)
    return kernel, sk


def _local_attention(q, k, v, key_mask, *, window: int | None, interpret: bool):
    """Splash on one device's block: q [b, T, H, D], k/v [b, T, K, D], key_mask [b, T]."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    padded = -(-t // BLOCK) * BLOCK
    if padded != t:  # right-pad with pad tokens (segment 0): real queries never see them
        pad = ((0, 0), (0, padded - t), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
        key_mask = jnp.pad(key_mask, ((0, 0), (0, padded - t)))
    kernel, sk = splash_kernel(padded, h // kv, window, interpret)
    q = q.reshape(b, padded, kv, h // kv, d).transpose(0, 2, 3, 1, 4)  # [b, K, G, T, D]
    k, v = (x.transpose(0, 2, 1, 3) for x in (k, v))                   # [b, K, T, D]
    segments = (key_mask > 0).astype(jnp.int32)

    def one_row(q_row, k_row, v_row, seg):  # [K, G, T, D], [K, T, D], [K, T, D], [T]
        ids = sk.SegmentIds(q=seg, kv=seg)
        return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=ids))(q_row, k_row, v_row)

    out = jax.vmap(one_row)(q, k, v, segments)  # [b, K, G, T, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, padded, h, d)[:, :t].astype(q.dtype)


def _specs(mesh, batch: int, kv_heads: int) -> tuple[P, P]:
    """(spec of q/k/v, spec of key_mask): rows over the batch axes when they divide the batch, heads over
    `tensor` when it divides the KV heads (each device then holds whole GQA groups)."""
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    rows = tuple(a for a in ("data", "fsdp") if sizes.get(a, 1) > 1)
    rows = rows if rows and batch % math.prod(sizes[a] for a in rows) == 0 else None
    heads = "tensor" if sizes.get("tensor", 1) > 1 and kv_heads % sizes["tensor"] == 0 else None
    return P(rows, None, heads, None), P(rows, None)


def splash_attention(q, k, v, key_mask, *, window: int | None = None, interpret: bool | None = None):
    """Splash attention over the context mesh (`sharding.axis_rules` sets it) under shard_map; without a mesh
    (or a one-device one) the kernel runs on the whole arrays. `interpret` defaults to: not a TPU mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    on_mesh = not mesh.empty and mesh.size > 1
    if interpret is None:
        platform = mesh.abstract_device.platform if not mesh.empty and mesh.abstract_device else jax.default_backend()
        interpret = platform != "tpu"
    local = functools.partial(_local_attention, window=window, interpret=interpret)
    if not on_mesh:
        return local(q, k, v, key_mask)
    qkv, rows = _specs(mesh, q.shape[0], k.shape[2])
    return jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, rows), out_specs=qkv, check_vma=False)(
        q, k, v, key_mask)
