"""The model levers of issue 28 against independent references: the prefix-bidirectional mask (a dense numpy
mask, numpy attention values and their analytic gradients, causal when off, decoding with the KV cache equal
to decoding by recomputation, nothing after [EMB]'s read position reaching the embedding, the frozen bottom's
cached features equal to running it) and the poolings (numpy means and softmax weights)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from notellm_jax.model.attention import attend
from notellm_jax.model.decode import greedy_decode
from notellm_jax.model.families import LlamaConfig
from notellm_jax.model.llama import Llama, attention_allowed
from notellm_jax.model.notellm import NoteLLM
from notellm_jax.model.params import init_params, stack_layers
from notellm_jax.model.precision import Precision
from tests.numpy_params import numpy_params

B, T, H, K, D = 2, 10, 4, 2, 8
CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)


def dense_allowed(mask: np.ndarray, prefix_end: np.ndarray | None) -> np.ndarray:
    """[B, T, T] by the definition, one entry at a time: causal, or both slots inside the row's prefix."""
    out = np.zeros((mask.shape[0], T, T), bool)
    for b in range(mask.shape[0]):
        for i in range(T):
            for j in range(T):
                inside = prefix_end is not None and i < prefix_end[b] and j < prefix_end[b]
                out[b, i, j] = bool(mask[b, j]) and (j <= i or inside)
    return out


def numpy_attention_and_grads(q, k, v, allowed, d_out):
    """float64 softmax attention per head (GQA: query head h reads KV head h // (H // K)) and the analytic
    gradients of sum(out * d_out) w.r.t. q, k and v."""
    q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, d_out))
    out, dq, dk, dv = np.zeros(q.shape), np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    for b in range(q.shape[0]):
        for h in range(H):
            kv = h // (H // K)
            s = np.where(allowed[b], q[b, :, h] @ k[b, :, kv].T / np.sqrt(D), -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[b, :, h] = p @ v[b, :, kv]
            dp = d_out[b, :, h] @ v[b, :, kv].T
            ds = p * (dp - (dp * p).sum(-1, keepdims=True))
            dq[b, :, h] = ds @ k[b, :, kv] / np.sqrt(D)
            dk[b, :, kv] += ds.T @ q[b, :, h] / np.sqrt(D)
            dv[b, :, kv] += p.T @ d_out[b, :, h]
    return out, dq, dk, dv


@pytest.mark.parametrize("implementation", ["einsum", "dot_product"])
def test_prefix_mask_values_and_gradients_equal_dense_numpy(implementation):
    rng = np.random.default_rng(0)
    mask = np.ones((B, T), np.int32)
    mask[1, 7:] = 0  # right padding
    prefix_end = np.array([6, 4], np.int32)
    allowed = np.asarray(attention_allowed(jnp.broadcast_to(jnp.arange(T), (B, T)), T, jnp.asarray(mask),
                                           jnp.asarray(prefix_end)))
    want_allowed = dense_allowed(mask, prefix_end)
    np.testing.assert_array_equal(allowed, want_allowed)
    assert allowed[0, 0, 5] and not allowed[0, 0, 6] and allowed[0, 8, 6]  # prefix both ways, the rest causal
    q, k, v = (rng.normal(size=s).astype(np.float32) for s in ((B, T, H, D), (B, T, K, D), (B, T, K, D)))
    d_out = rng.normal(size=(B, T, H, D)).astype(np.float32)
    real = mask > 0

    def objective(q, k, v):
        out = attend(q, k, v, jnp.asarray(allowed), jnp.asarray(mask), implementation=implementation,
                     precision=Precision())
        return jnp.sum(jnp.where(jnp.asarray(real)[:, :, None, None], out * d_out, 0.0)), out

    (_, out), grads = jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    want_out, *want_grads = numpy_attention_and_grads(q, k, v, want_allowed, d_out * real[:, :, None, None])
    np.testing.assert_allclose(np.asarray(out)[real], want_out[real], atol=1e-5)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


@pytest.fixture(scope="module")
def params():
    return numpy_params(lambda key: init_params(CFG, key), jax.random.key(0))


def forward(params, ids, mask, prefix_end=None, prefix_from_layer=0):
    return np.asarray(Llama(CFG).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                                       prefix_end=prefix_end, prefix_from_layer=prefix_from_layer))


def test_off_and_empty_prefix_are_causal_and_later_tokens_do_not_reach_the_prefix(params):
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 64, (B, T)).astype(np.int32)
    mask = np.ones_like(ids)
    causal = forward(params, ids, mask)
    np.testing.assert_allclose(forward(params, ids, mask, jnp.array([0, 1])), causal, atol=1e-6)
    bidirectional = forward(params, ids, mask, jnp.array([5, 5]))
    changed_inside, changed_after = ids.copy(), ids.copy()
    changed_inside[:, 4] = (ids[:, 4] + 1) % 64
    changed_after[:, 5:] = (ids[:, 5:] + 7) % 64
    assert not np.allclose(forward(params, changed_inside, mask, jnp.array([5, 5]))[:, 0], bidirectional[:, 0])
    np.testing.assert_allclose(forward(params, changed_after, mask, jnp.array([5, 5]))[:, :5], bidirectional[:, :5],
                               atol=1e-6)
    # Below prefix_from_layer the layers stay causal: slot 0 of layer 0 ignores slot 4 (a 1-layer slice shows it).
    def layer0(tokens):
        return np.asarray(Llama(CFG).apply({"params": params}, jnp.asarray(tokens), jnp.asarray(mask), last_layer=1,
                                           prefix_end=jnp.array([5, 5]), prefix_from_layer=1))[:, 0]
    np.testing.assert_allclose(layer0(changed_inside), layer0(ids), atol=1e-6)


@pytest.mark.parametrize("prefix_from_layer", [0, 1])
def test_cached_decode_with_a_prefix_equals_recomputation(params, prefix_from_layer):
    """Left-padded prompts with their bidirectional prefix: greedy decoding with the KV cache equals greedy
    decoding by recomputing the whole (unpadded) sequence, with the same prefix, at every step."""
    rng = np.random.default_rng(2)
    prompts = [rng.integers(1, 64, 7).tolist(), rng.integers(1, 64, 5).tolist()]
    ends = [4, 3]  # per prompt, unpadded slots
    width, new = 8, 5
    ids = np.zeros((B, width), np.int32)
    mask = np.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
    shift = np.array([width - len(p) for p in prompts])
    got = greedy_decode(Llama(CFG), params, ids, mask, new, eos_id=-1, prefix_end=np.array(ends) + shift,
                        prefix_from_layer=prefix_from_layer)

    @jax.jit
    def next_token(seq, seq_mask, end):  # one fixed right-padded width: one compilation
        hidden = Llama(CFG).apply({"params": params}, seq, seq_mask, prefix_end=end,
                                  prefix_from_layer=prefix_from_layer)
        last = jnp.sum(seq_mask, axis=1) - 1
        return jnp.argmax(Llama(CFG).apply({"params": params}, hidden[0, last], method=Llama.logits), axis=-1)

    for row, prompt in enumerate(prompts):
        tokens = list(prompt)
        for _ in range(new):
            seq = np.zeros((1, width + new), np.int32)
            seq[0, :len(tokens)] = tokens
            token = next_token(seq, (np.arange(width + new) < len(tokens)).astype(np.int32)[None],
                               jnp.array([ends[row]]))
            tokens.append(int(token[0]))
        assert got[row].tolist() == tokens[len(prompt):]


def notellm_batch(rng, read_pos=(4, 6)):
    ids = rng.integers(1, 64, (B, T)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "embed_read_pos": np.array(read_pos, np.int32),
            "target_positions": np.array([[7, 8], [8, 9]], np.int32)}


def notellm_params(params, model, batch):
    shapes = jax.eval_shape(lambda key: model.init(key, batch), jax.random.key(0))["params"]
    rng = np.random.default_rng(3)
    extra = {k: jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32) * 0.3, v)
             for k, v in nn.meta.unbox(shapes).items() if k != "decoder"}
    return {**extra, "decoder": params}


@pytest.mark.parametrize("bidirectional_from", [0, 1])
def test_tokens_after_the_read_position_cannot_change_the_embedding(params, bidirectional_from):
    rng = np.random.default_rng(4)
    model = NoteLLM(CFG, emb_dim=8, bidirectional_from=bidirectional_from)
    batch = notellm_batch(rng)
    full = notellm_params(params, model, batch)
    embed = lambda b: np.asarray(model.apply({"params": full}, b, with_logits=False)["embedding"])  # noqa: E731
    later = {**batch, "input_ids": np.where(np.arange(T)[None] > batch["embed_read_pos"][:, None],
                                            (batch["input_ids"] + 5) % 64, batch["input_ids"])}
    np.testing.assert_allclose(embed(later), embed(batch), atol=1e-6)
    causal = np.asarray(NoteLLM(CFG, emb_dim=8).apply({"params": full}, batch, with_logits=False)["embedding"])
    # From layer 0 the prefix really attends both ways. In the last layer alone it cannot change the [EMB]
    # read-out: that layer's only query is the read position, which sees the whole prefix causally anyway.
    assert np.allclose(causal, embed(batch), atol=1e-6) == (bidirectional_from == CFG.num_hidden_layers - 1)
    # The frozen bottom's output (the feature cache's content) entering above it gives the same embedding.
    hidden_in = model.apply({"params": full}, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                            1, method=NoteLLM.bottom)
    cached = {k: v for k, v in batch.items() if k != "input_ids"} | {"hidden_in": hidden_in}
    if bidirectional_from == 1:  # the bottom is layer 0, causal; the prefix starts above it
        got = model.apply({"params": full}, cached, first_layer=1, with_logits=False)["embedding"]
        np.testing.assert_allclose(np.asarray(got), embed(batch), atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_pooling_equals_numpy(params, pooling):
    rng = np.random.default_rng(5)
    batch = notellm_batch(rng)
    batch["attention_mask"][1, :2] = 0  # left padding: pads are not pooled
    model = NoteLLM(CFG, emb_dim=8, pooling=pooling)
    full = notellm_params(params, model, batch)
    out = model.apply({"params": full}, batch)
    hidden = np.asarray(Llama(CFG).apply({"params": params}, batch["input_ids"], batch["attention_mask"]), np.float64)
    pooled = []
    for row in range(B):
        keep = [t for t in range(batch["embed_read_pos"][row] + 1) if batch["attention_mask"][row, t]]
        h = hidden[row, keep]
        if pooling == "mean":
            weights = np.full(len(keep), 1.0 / len(keep))
        else:
            scores = h @ np.asarray(full["pooler"]["query"], np.float64) / np.sqrt(CFG.hidden_size)
            weights = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
        pooled.append(weights @ h)
    z = np.stack(pooled) @ np.asarray(full["proj"]["kernel"], np.float64)
    np.testing.assert_allclose(np.asarray(out["embedding"]), z / np.linalg.norm(z, axis=-1, keepdims=True), atol=1e-5)
    # The generation logits are read at the target positions as with the [EMB] read-out.
    emb_model = NoteLLM(CFG, emb_dim=8)
    want_logits = emb_model.apply({"params": {k: v for k, v in full.items() if k != "pooler"}}, batch)["gen_logits"]
    np.testing.assert_allclose(np.asarray(out["gen_logits"]), np.asarray(want_logits), atol=1e-5)


def test_scanned_layers_take_the_prefix_as_unscanned_ones_do(params):
    """The accelerator recipe scans its layers (configs/smollm2_se.py:full): the prefix reaches every scanned
    layer, and a prefix above causal layers is refused there (it needs per-layer masks)."""
    rng = np.random.default_rng(6)
    ids = rng.integers(1, 64, (B, T)).astype(np.int32)
    mask = np.ones_like(ids)
    scanned = Llama(CFG.replace(scan_layers=True))
    stacked = stack_layers(params)
    got = scanned.apply({"params": stacked}, ids, mask, prefix_end=jnp.array([5, 3]))
    np.testing.assert_allclose(np.asarray(got), forward(params, ids, mask, jnp.array([5, 3])), atol=1e-5)
    with pytest.raises(ValueError, match="needs scan_layers=False"):
        scanned.apply({"params": stacked}, ids, mask, prefix_end=jnp.array([5, 3]), prefix_from_layer=1)
