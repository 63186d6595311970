"""Vocabulary padding (`model.vocab_pad_multiple`) in the model: zero rows that no loss or decoding sees.

A random 300-token model and the same weights padded to 384 entries (`grow_vocab` with no new token) give
the same logits on the real entries, the lowest finite logit on the padded ones, the same generation
loss and the same greedy tokens (per-slice growth and the HF export: tests/unit/test_vocab_padding.py).
"""
import jax.numpy as jnp
import numpy as np
from numpy_params import padded_tiny_models

from notellm_jax.model.decode import greedy_decode
from notellm_jax.model.llama import Llama
from notellm_jax.model.notellm import generation_loss


def test_padded_entries_are_zero_masked_and_change_nothing():
    cfg, params, padded_cfg, padded = padded_tiny_models()
    assert padded_cfg.vocab_size == 300 and padded_cfg.padded_vocab_size == 384
    assert padded["embed_tokens"]["embedding"].shape == (384, 64) and padded["lm_head"]["kernel"].shape == (64, 384)
    assert not padded["embed_tokens"]["embedding"][300:].any() and not padded["lm_head"]["kernel"][:, 300:].any()
    ids = np.random.default_rng(0).integers(0, 300, (2, 7)).astype(np.int32)

    def logits(c, p):
        model = Llama(c)
        return model.apply({"params": p}, model.apply({"params": p}, ids), method=Llama.logits)

    want, got = logits(cfg, params), logits(padded_cfg, padded)
    np.testing.assert_allclose(got[..., :300], want, atol=1e-6)
    assert (np.asarray(got[..., 300:]) == jnp.finfo(jnp.float32).min).all()
    targets, mask = ids[:, 1:], np.ones((2, 6), np.float32)
    np.testing.assert_allclose(generation_loss(got[:, :-1], targets, mask), generation_loss(want[:, :-1], targets, mask),
                               rtol=1e-6)
    np.testing.assert_array_equal(greedy_decode(Llama(padded_cfg), padded, ids, np.ones_like(ids), 6, -1),
                                  greedy_decode(Llama(cfg), params, ids, np.ones_like(ids), 6, -1))
