"""Vocabulary padding (`model.vocab_pad_multiple`) per slice, and lazy kernels (numpy weights, nothing compiled).

Padded rows are zero and the HF export drops them; the lazy per-slice growth (`VocabGrown`, used when
loading sharded) equals the whole-array growth (`add_tokens`, and for a table padded beyond its tokenizer,
as Qwen's, `init_unused_token`), seen transposed too (an untied head copy). The model's masking of the
padded logits: tests/integration/test_padded_vocab_model.py.
"""
import numpy as np
from numpy_params import padded_tiny_models

from notellm_jax.model.params import add_tokens, grow_vocab, init_unused_token
from notellm_jax.weights.hf import params_to_hf
from notellm_jax.weights.lazy import ArrayTensor, Kernel, Transposed, VocabGrown


def test_padding_is_zero_and_the_hf_export_drops_it():
    cfg, params, padded_cfg, padded = padded_tiny_models()
    assert padded_cfg.vocab_size == 300 and padded_cfg.padded_vocab_size == 384
    assert padded["embed_tokens"]["embedding"].shape == (384, 64) and padded["lm_head"]["kernel"].shape == (64, 384)
    assert not padded["embed_tokens"]["embedding"][300:].any() and not padded["lm_head"]["kernel"][:, 300:].any()
    hf = params_to_hf(padded, padded_cfg)
    assert hf["model.embed_tokens.weight"].shape == (300, 64) and hf["lm_head.weight"].shape == (300, 64)
    np.testing.assert_array_equal(hf["lm_head.weight"], params["lm_head"]["kernel"].T)


def test_lazy_growth_per_slice_equals_add_tokens():
    cfg, params, _, _ = padded_tiny_models()
    grown, grown_cfg = add_tokens(params, cfg.replace(vocab_pad_multiple=128), 1)
    table = VocabGrown(ArrayTensor(params["embed_tokens"]["embedding"]), 0, 1, 384)
    head = VocabGrown(Kernel(ArrayTensor(np.ascontiguousarray(params["lm_head"]["kernel"].T)), (64, 300), 1), 1, 1, 384)
    for index in [(slice(0, 96), slice(16, 48)), (slice(288, 384), slice(None)), (slice(300, 301), slice(0, 8)),
                  (slice(320, 384), slice(8, 16))]:  # the last: padding only
        np.testing.assert_allclose(table.read(index), grown["embed_tokens"]["embedding"][index], atol=1e-7)
        np.testing.assert_allclose(head.read(index[::-1]), grown["lm_head"]["kernel"][index[::-1]], atol=1e-7)
    assert grown_cfg.vocab_size == 301 and grown["embed_tokens"]["embedding"].shape == (384, 64)
    padded, _ = grow_vocab(params, cfg.replace(vocab_pad_multiple=128), 0)  # no [EMB]: padding alone
    table = VocabGrown(ArrayTensor(params["embed_tokens"]["embedding"]), 0, 0, 384)
    for index in [(slice(288, 384), slice(None)), (slice(320, 384), slice(0, 8))]:
        np.testing.assert_array_equal(table.read(index), padded["embed_tokens"]["embedding"][index])


def test_lazy_unused_row_per_slice_equals_init_unused_token():
    """A 300-row table whose tokenizer ends at 290: [EMB] takes row 290 (mean of rows 0..289), nothing is
    appended, and the 384-entry padding starts at 300; also through `Transposed` (untie_head's copy)."""
    cfg, params, _, _ = padded_tiny_models()
    want = init_unused_token(params, cfg, 290)["embed_tokens"]["embedding"]
    np.testing.assert_allclose(want[290], params["embed_tokens"]["embedding"][:290].mean(0), rtol=1e-6, atol=1e-7)
    assert not np.array_equal(want[290], params["embed_tokens"]["embedding"][290])
    padded, padded_cfg = grow_vocab(params, cfg.replace(vocab_pad_multiple=128), reset=290)
    assert padded_cfg.vocab_size == 300 and padded["embed_tokens"]["embedding"].shape == (384, 64)
    np.testing.assert_array_equal(padded["embed_tokens"]["embedding"][:300], want)
    table = VocabGrown(ArrayTensor(params["embed_tokens"]["embedding"]), 0, 0, 384, reset=290)
    for index in [(slice(0, 96), slice(None)), (slice(288, 292), slice(8, 24)), (slice(290, 291), slice(0, 8)),
                  (slice(296, 384), slice(None))]:
        np.testing.assert_allclose(table.read(index), padded["embed_tokens"]["embedding"][index], atol=1e-7)
        np.testing.assert_allclose(Transposed(table).read(index[::-1]),
                                   padded["embed_tokens"]["embedding"][index].T, atol=1e-7)


def test_kernel_slices_equal_the_transposed_reshaped_weight():
    """Any shard of a Flax kernel read lazily from the torch [out, in] weight equals slicing W.T reshaped,
    for q_proj-like (heads out of `out`) and o_proj-like (heads into `in`) layouts."""
    w = np.random.default_rng(0).standard_normal((48, 40)).astype(np.float32)  # [out, in]
    for shape, contract in (((40, 6, 8), 1), ((5, 8, 48), 2)):
        kernel = Kernel(ArrayTensor(w), shape, contract)  # q_proj: in x=40, out 6x8; o_proj: in 5x8, out x=48
        want = w.T.reshape(shape)
        for index in [(slice(0, 10), slice(None), slice(None)), (slice(2, 5), slice(1, 3), slice(4, 8)),
                      (slice(None), slice(5, 6), slice(0, 48, 3))]:
            index = index[:len(shape)]
            np.testing.assert_array_equal(kernel.read(index), want[index])
