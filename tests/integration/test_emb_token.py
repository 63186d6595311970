"""[EMB] growth (`add_tokens`): existing tokens' logits unchanged, new rows/columns are the means."""
from __future__ import annotations

import numpy as np
import pytest

from notellm_jax.model.decode import CausalLM
from notellm_jax.model.llama import Llama
from notellm_jax.model.params import add_tokens, stack_layers
from notellm_jax.weights.formats import load_params

IDS = np.array([[1, 400, 261, 300, 77, 42, 9], [1, 5, 6, 7, 0, 0, 0]])
MASK = np.array([[1] * 7, [1] * 4 + [0] * 3])


def _tied(stories_dir):
    return load_params(stories_dir / "stories260K.bin")


def _untied(stories_dir):
    """stories260K's body with a separate random head (stories260K ties its head, so an untied head is made up here)."""
    params, cfg = _tied(stories_dir)
    head = np.random.default_rng(0).normal(0, 0.5, (cfg.hidden_size, cfg.vocab_size)).astype(np.float32)
    return {**params, "lm_head": {"kernel": head}}, cfg.replace(tie_word_embeddings=False)


def _hidden(params, cfg) -> np.ndarray:
    return np.asarray(Llama(cfg).apply({"params": params}, IDS, MASK))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)


@pytest.mark.parametrize("n_new", [1, 3])
@pytest.mark.parametrize("make", [_tied, _untied], ids=["tied", "untied"])
def test_add_tokens_keeps_existing_logits(stories_dir, make, n_new):
    params, cfg = make(stories_dir)
    before = CausalLM(params, cfg).logits(IDS, MASK)
    grown, grown_cfg = add_tokens(params, cfg, n_new)
    assert grown_cfg.vocab_size == cfg.vocab_size + n_new and cfg.vocab_size == before.shape[-1]
    after = CausalLM(grown, grown_cfg).logits(IDS, MASK)
    v = cfg.vocab_size
    # The body sees identical inputs and weights: hidden states are bitwise equal. The head matmul over
    # v + n_new columns may sum in another order, so logits agree to float32 rounding (|logit| <= ~15 here,
    # ulp ~1e-6; measured max diff 1e-5), as does the softmax over the old vocabulary.
    np.testing.assert_array_equal(_hidden(grown, grown_cfg), _hidden(params, cfg))
    np.testing.assert_allclose(after[..., :v], before, atol=2e-5, rtol=0)
    np.testing.assert_allclose(_log_softmax(after[..., :v]), _log_softmax(before), atol=2e-5, rtol=0)
    # New input rows are the mean embedding; the new tokens' logit is the mean of the old logits.
    embedding = np.asarray(params["embed_tokens"]["embedding"], np.float64)
    np.testing.assert_allclose(np.asarray(grown["embed_tokens"]["embedding"])[v:],
                               np.repeat(embedding.mean(0, keepdims=True), n_new, 0), atol=1e-6)
    np.testing.assert_allclose(after[..., v:], np.repeat(before.mean(-1, keepdims=True), n_new, -1), atol=1e-4)


def test_new_token_is_usable_as_input_and_scanned_params_grow(stories_dir):
    params, cfg = _tied(stories_dir)
    grown, grown_cfg = add_tokens(stack_layers(params), cfg.replace(scan_layers=True))
    emb_id = cfg.vocab_size
    ids = np.array([[1, 400, 261, emb_id]])
    logits = CausalLM(grown, grown_cfg).logits(ids)
    assert logits.shape == (1, 4, cfg.vocab_size + 1) and np.isfinite(logits).all()
    # The grown, scanned model agrees with the original on everything before the new token (causal).
    np.testing.assert_allclose(logits[:, :3, :-1], CausalLM(params, cfg).logits(ids[:, :3]), atol=2e-5, rtol=0)


def test_add_tokens_rejects_nonpositive_count(stories_dir):
    params, cfg = _tied(stories_dir)
    with pytest.raises(ValueError, match="n_new must be >= 1"):
        add_tokens(params, cfg, 0)
