"""The trainable generation head under partial training, and LoRA adapters: training moves what it should,
and the exports (NoteLLM params and the HF folder) reproduce the trained model, against HF PyTorch logits.

All on the random stories260K-shaped model (5 layers, tied head) with synthetic batches, fp32 on CPU.
"""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import notellm_jax  # noqa: F401
from notellm_jax.config import load_config, override
from notellm_jax.data.input_pipeline import synthetic_batches
from notellm_jax.infer.feature_cache import FeatureCache
from notellm_jax.model.llama import Llama
from notellm_jax.model.lora import lora_applied, lora_scale
from notellm_jax.sharding import make_mesh
from notellm_jax.train.step import (apply_model, compile_steps, create_state, merged_params, loss_and_grads,
                                    make_train_setup, to_global_batch)
from notellm_jax.weights.export import save_hf_decoder
from notellm_jax.weights.loading import load_initial_params
from step_compare import assert_same_grads, assert_same_metrics

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.py") + ":random"
OVERRIDES = ["train.synthetic_data=true", "prompt.max_length=16", "prompt.title_max_tokens=4",
             "prompt.content_max_tokens=8", "prompt.max_targets=4", "train.batch_pairs=4", "train.max_steps=2",
             "train.warmup_fraction=0", "train.learning_rate=1e-2"]


def _trained(extra: dict):
    """(config, spec, initial params, state after one step, grads of that step)."""
    config = override(load_config(TINY, OVERRIDES), extra)
    params, llama_cfg = load_initial_params(config, None)
    spec = make_train_setup(config, llama_cfg, make_mesh(1, 2, 1, devices=jax.devices()[:2]), 2)
    batch = to_global_batch(spec, next(synthetic_batches(config, llama_cfg, 0)))
    initial = jax.device_get(params)  # host copy: the loaded arrays become the state, which the step donates
    state = create_state(spec, params)
    _, grads = jax.jit(partial(loss_and_grads, setup=spec))(state, batch)
    step_fn, _ = compile_steps(spec)
    state, _ = step_fn(state, batch)
    return config, spec, llama_cfg, initial, state, jax.device_get(grads)


def _torch_logits(folder: Path, ids: np.ndarray) -> tuple[np.ndarray, dict]:
    import torch
    import transformers
    model = transformers.LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(ids.astype(np.int64))).logits.float().numpy()
    return logits, json.loads((folder / "config.json").read_text())


def _jax_logits(llama_cfg, decoder: dict, ids: np.ndarray, adapters=None, scale: float = 0.0) -> np.ndarray:
    model = Llama(llama_cfg)

    @jax.jit
    def run(p, a):
        with lora_applied(a, scale, root=()):
            return model.apply({"params": p}, model.apply({"params": p}, ids), method=Llama.logits)
    return np.asarray(run(decoder, adapters))


IDS = np.random.default_rng(0).integers(3, 500, size=(2, 11))


@pytest.fixture(scope="module")
def top_layers_run():
    return _trained({"model.train_top_layers": 2})


@pytest.mark.slow  # compiles a train step (about 30 s on an idle 2-core CPU)
def test_tied_model_gets_an_untied_head_copy_that_trains_under_train_top_layers(top_layers_run):
    _, _, llama_cfg, params, state, grads = top_layers_run
    decoder = params["decoder"]
    assert not llama_cfg.tie_word_embeddings
    np.testing.assert_array_equal(decoder["lm_head"]["kernel"], decoder["embed_tokens"]["embedding"].T)
    assert "embed_tokens" in state.frozen["decoder"] and "lm_head" in state.params["decoder"]
    assert np.linalg.norm(grads["decoder"]["lm_head"]["kernel"]) > 1e-3  # CSFT reaches the head
    moved = np.asarray(state.params["decoder"]["lm_head"]["kernel"]) - decoder["lm_head"]["kernel"]
    assert np.abs(moved).max() > 1e-3
    np.testing.assert_array_equal(state.frozen["decoder"]["embed_tokens"]["embedding"],
                                  decoder["embed_tokens"]["embedding"])


def test_untie_head_false_keeps_the_tied_frozen_head():
    config = override(load_config(TINY, OVERRIDES), {"model.train_top_layers": 2, "model.untie_head": False})
    params, llama_cfg = load_initial_params(config, None)
    assert llama_cfg.tie_word_embeddings and "lm_head" not in params["decoder"]


@pytest.mark.slow  # compiles a train step (about 30 s on an idle 2-core CPU)
def test_untied_head_export_matches_hf_torch_logits(top_layers_run, tmp_path):
    _, spec, llama_cfg, _, state, _ = top_layers_run
    params = jax.device_get(merged_params(spec, state))
    torch_logits, hf_config = _torch_logits(save_hf_decoder(params, llama_cfg, tmp_path / "hf"), IDS)
    assert hf_config["tie_word_embeddings"] is False
    np.testing.assert_allclose(torch_logits, _jax_logits(llama_cfg, params["decoder"], IDS), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def lora_run():
    return _trained({"model.lora_rank": 4, "model.lora_alpha": 8.0})


@pytest.mark.slow  # compiles a train step (about 30 s on an idle 2-core CPU)
def test_lora_trains_adapters_head_projection_and_logit_scale_only(lora_run):
    _, _, _, params, state, grads = lora_run
    trained_decoder = set(state.params["decoder"])
    assert trained_decoder == {"lm_head"} and set(state.params) == {"decoder", "lora", "proj", "log_logit_scale"}
    assert set(state.frozen["decoder"]) >= {"embed_tokens", "norm", "layers_0", "layers_4"}
    adapter = state.params["lora"]["layers_2"]["attn"]["q_proj"]
    assert adapter["a"].shape == (64, 4) and adapter["b"].shape == (4, 8, 8)
    assert np.abs(np.asarray(adapter["b"])).max() > 1e-3  # B starts at zero and moved
    assert np.linalg.norm(grads["lora"]["layers_0"]["mlp"]["down_proj"]["b"]) > 0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.frozen),
                 {"decoder": {k: v for k, v in params["decoder"].items() if k != "lm_head"}})


@pytest.mark.slow  # compiles a train step (about 30 s on an idle 2-core CPU)
def test_lora_merged_export_equals_unmerged_model(lora_run, tmp_path):
    """Adapters with a non-zero B (after a step at lr 1e-2): merged weights == x W + s (x A) B, fp32 1e-5."""
    config, spec, llama_cfg, _, state, _ = lora_run
    merged = jax.device_get(merged_params(spec, state))
    assert "lora" not in merged
    unmerged = jax.device_get({**state.params, "decoder": {**state.frozen["decoder"], **state.params["decoder"]}})
    scale = lora_scale(4, 8.0)
    want = _jax_logits(llama_cfg, unmerged["decoder"], IDS, unmerged["lora"], scale)
    plain = _jax_logits(llama_cfg, unmerged["decoder"], IDS)
    assert np.abs(want - plain).max() > 1e-3  # the adapters change the model: the comparison is not vacuous
    torch_logits, _ = _torch_logits(save_hf_decoder(merged, llama_cfg, tmp_path / "hf"), IDS)
    np.testing.assert_allclose(torch_logits, want, rtol=1e-5, atol=1e-5)
    # NoteLLM heads too: the embedding and generation logits of the unmerged training model.
    batch = {"input_ids": jnp.asarray(IDS), "attention_mask": jnp.ones(IDS.shape, jnp.int32),
             "embed_read_pos": jnp.asarray([5, 9]), "target_positions": jnp.asarray([[6, 7], [9, 10]])}
    got = jax.jit(lambda p: spec.model.apply({"params": p}, batch))(merged)
    ref = jax.jit(lambda p: apply_model(spec, p, batch))(unmerged)
    for key in ("embedding", "gen_logits"):
        np.testing.assert_allclose(np.asarray(got[key]), np.asarray(ref[key]), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # compiles two train steps
def test_lora_above_the_cached_bottom_equals_the_model_without_the_cache():
    """LoRA on the top 2 of 5 layers: adapters there only; the step fed the FeatureCache's bottom features
    gives the loss and gradients of the same model run from the tokens (adapters with a non-zero B)."""
    config = override(load_config(TINY, OVERRIDES), {"model.train_top_layers": 2, "model.lora_rank": 4,
                                                     "model.lora_alpha": 8.0})
    config.validate(8, training=True)
    params, llama_cfg = load_initial_params(config, None)
    assert set(params["lora"]) == {"layers_3", "layers_4"}
    rng = np.random.default_rng(1)
    params["lora"] = jax.tree.map(lambda x: x + 0.05 * rng.normal(size=x.shape).astype(np.float32), params["lora"])
    spec = make_train_setup(config, llama_cfg, make_mesh(1, 2, 1, devices=jax.devices()[:2]), 2)
    local = next(synthetic_batches(config, llama_cfg, 0))
    state = create_state(spec, params)
    assert spec.frozen_layers == 3 and set(state.params["decoder"]) == {"lm_head"}
    features = FeatureCache(spec.model, spec.mesh, spec.frozen_layers).features(
        state.frozen, local["input_ids"], local["attention_mask"])
    cached = {**{k: v for k, v in local.items() if k != "input_ids"}, "hidden_in": features}
    step = jax.jit(partial(loss_and_grads, setup=spec))
    want_metrics, want_grads = jax.device_get(step(state, to_global_batch(spec, local)))
    got_metrics, got_grads = jax.device_get(step(state, to_global_batch(spec, cached)))
    assert_same_metrics(got_metrics, want_metrics)
    assert_same_grads(got_grads, want_grads)
