"""`read_positions`: the last layer computed at the read rows alone equals the full pass read at those rows.

Llama level: every family feature that touches the query side (GQA, q/k norms, biases, a sliding window,
RoPE scaling), left and right padding, rows read at pads, scanned layers, and a slice of the layers entered
from hidden states. NoteLLM level: the losses and every gradient of the production forward (which reads only
[EMB]'s position and the supervised ones) against a reference that runs the whole last layer and gathers
afterwards (the computation before read positions existed), on the tiny random model, from token ids and from
frozen-bottom features.
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import notellm_jax  # noqa: F401
from notellm_jax.config import load_config
from notellm_jax.data.input_pipeline import synthetic_batches
from notellm_jax.model.families import LlamaConfig
from notellm_jax.model.llama import Llama
from notellm_jax.model.notellm import generation_loss, notellm_losses, contrastive_loss, combine_losses
from notellm_jax.weights.loading import load_initial_params, make_model

VOCAB, LENGTH = 61, 24
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
FAMILIES = {
    "llama_gqa": {},
    "llama3_scaling_bias": dict(rope_type="llama3", rope_factor=4.0, rope_original_max_position=16,
                                attention_bias=True, attention_out_bias=True),
    "qwen3_qk_norm": dict(model_type="qwen3", qk_norm=True, head_dim=16),
    "mistral_window4": dict(model_type="mistral", sliding_window=4),
    "scanned": dict(scan_layers=True),
}


def _inputs(seed: int):
    """Three rows: unpadded, right-padded (17 real) and left-padded (15 real); read positions that include
    the first and last token, pads, repeats and an unsorted order."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, size=(3, LENGTH))
    mask = np.ones_like(ids)
    mask[1, 17:] = 0
    mask[2, :LENGTH - 15] = 0
    read = np.array([[0, LENGTH - 1, 5, 5, 11], [16, 3, 20, 0, 9], [LENGTH - 1, 9, 2, 12, 12]])
    return jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), jnp.asarray(read, jnp.int32)


def _randomised(params, seed: int):
    """Every weight away from its init (norm scales off 1, biases off 0), so no term can hide."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape, x.dtype) + (x if x.ndim > 1 else 1.0)
                                     for k, x in zip(keys, leaves)])


@pytest.mark.parametrize("name", list(FAMILIES))
def test_llama_read_positions_equal_the_full_pass_at_those_rows(name):
    cfg = LlamaConfig(**{**BASE, **FAMILIES[name]})
    model = Llama(cfg)
    ids, mask, read = _inputs(len(name))
    params = _randomised(model.init(jax.random.PRNGKey(0), ids, mask)["params"], len(name))
    full = model.apply({"params": params}, ids, mask)
    got = model.apply({"params": params}, ids, mask, read_positions=read)
    want = np.take_along_axis(np.asarray(full), np.asarray(read)[..., None], axis=1)
    assert got.shape == (3, read.shape[1], cfg.hidden_size)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(want).max() > 0.1  # not vacuous
    if cfg.scan_layers:
        return
    # A slice of the layers entered from hidden states (the frozen-bottom path), with and without the final norm.
    bottom = model.apply({"params": params}, ids, mask, last_layer=1, final_norm=False)
    for final_norm in (True, False):
        top_full = model.apply({"params": params}, None, mask, inputs_embeds=bottom, first_layer=1,
                               final_norm=final_norm)
        top = model.apply({"params": params}, None, mask, inputs_embeds=bottom, first_layer=1,
                          final_norm=final_norm, read_positions=read)
        np.testing.assert_allclose(top, np.take_along_axis(np.asarray(top_full), np.asarray(read)[..., None], 1),
                                   rtol=1e-5, atol=1e-5)
    if cfg.sliding_window:  # the window really acts on the read rows (row 0 reads position 23 and 11)
        wide = Llama(cfg.replace(sliding_window=None)).apply({"params": params}, ids, mask, read_positions=read)
        assert np.abs(np.asarray(wide)[0, 1] - np.asarray(got)[0, 1]).max() > 1e-2


def test_read_positions_refuse_a_cache():
    cfg = LlamaConfig(**BASE)
    model = Llama(cfg)
    ids, mask, read = _inputs(0)
    params = model.init(jax.random.PRNGKey(0), ids, mask)["params"]
    from notellm_jax.model.llama import init_cache
    with pytest.raises(ValueError, match="read_positions needs cache=None"):
        model.apply({"params": params}, ids, mask, cache=init_cache(cfg, 3, LENGTH), read_positions=read)


TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.py") + ":random"


def _reference_outputs(model, params, batch, first_layer):
    """The whole last layer, then the rows: [EMB]'s read position and the supervised positions."""
    def run(m):
        if "hidden_in" in batch:
            hidden = m.decoder(None, batch["attention_mask"], inputs_embeds=batch["hidden_in"], first_layer=first_layer)
        else:
            hidden = m.decoder(batch["input_ids"], batch["attention_mask"])
        gathered = jnp.take_along_axis(hidden, batch["target_positions"][..., None].astype(jnp.int32), axis=1)
        return m.embed_hidden(hidden, batch["embed_read_pos"]), m.decoder.logits(gathered)
    embedding, logits = model.apply({"params": params}, method=run)
    return embedding, logits


@pytest.mark.parametrize("first_layer", [pytest.param(0, marks=pytest.mark.slow), 2],
                         ids=["from_tokens", "from_bottom_features"])
def test_notellm_losses_and_gradients_equal_the_full_last_layer(first_layer):
    config = load_config(TINY, ["train.synthetic_data=true", "prompt.max_length=24", "prompt.title_max_tokens=4",
                                "prompt.content_max_tokens=8", "prompt.max_targets=4", "train.batch_pairs=4"])
    params, llama_cfg = load_initial_params(config, None)
    params = _randomised(params, 3)
    model = make_model(config, llama_cfg)
    local = next(synthetic_batches(config, llama_cfg, 0))
    batch = {k: jnp.asarray(v) for k, v in local.items()}
    if first_layer:
        batch["hidden_in"] = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                                         first_layer, method=model.bottom)
        del batch["input_ids"]
    alpha = 0.3

    def production(p):
        return notellm_losses(model.apply({"params": p}, batch, first_layer=first_layer), batch, alpha, "notellm")

    def reference(p):
        embedding, logits = _reference_outputs(model, p, batch, first_layer)
        l_cl, accuracy = contrastive_loss(embedding, batch["pair_id"], p["log_logit_scale"], batch.get("note_index"))
        l_gen = generation_loss(logits, batch["target_ids"], batch["target_mask"])
        return {"loss": combine_losses(l_cl, l_gen, alpha, "notellm"), "loss_cl": l_cl, "loss_gen": l_gen,
                "accuracy": accuracy}

    got, got_grads = jax.value_and_grad(lambda p: production(p)["loss"])(params)
    want, want_grads = jax.value_and_grad(lambda p: reference(p)["loss"])(params)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for key in ("loss_cl", "loss_gen", "accuracy"):
        np.testing.assert_allclose(production(params)[key], reference(params)[key], rtol=1e-5, err_msg=key)
    flat_got = jax.tree_util.tree_leaves_with_path(got_grads)
    flat_want = jax.tree_util.tree_leaves_with_path(want_grads)
    assert [p for p, _ in flat_got] == [p for p, _ in flat_want]
    checked = 0
    for (path, g), (_, w) in zip(flat_got, flat_want):
        scale = float(np.max(np.abs(w)))
        if scale == 0:  # layers below first_layer get no gradient in either computation
            assert float(np.max(np.abs(g))) == 0, jax.tree_util.keystr(path)
            continue
        checked += 1
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))
    assert checked >= 10
