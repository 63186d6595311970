"""Gemma 2 / 3 configuration: what config.json implies when fields are absent (transformers' config-class
defaults), the layer pattern, the fields other families refuse, and the attention implementations that cannot
express Gemma's attention. No model is built (the parity tests are in tests/integration/test_model_families.py)."""
from __future__ import annotations

import pytest

from notellm_jax.errors import CheckpointError
from notellm_jax.model.families import LlamaConfig, config_from_hf, preset

SHAPE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=7, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16)


def test_gemma2_absent_fields_take_transformers_defaults():
    """A minimal Gemma 2 config.json means what Gemma2Config makes of it: soft-caps 50 / 30, scalar 256,
    window 4,096, tied, alternating sliding and full layers (sliding first)."""
    cfg = config_from_hf({"model_type": "gemma2", **SHAPE}, "cfg.json")
    assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == (50.0, 30.0)
    assert (cfg.query_pre_attn_scalar, cfg.sliding_window, cfg.tie_word_embeddings) == (256, 4096, True)
    assert cfg.local_layers == (True, False, True, False, True, False, True)
    assert (cfg.hidden_act, cfg.norm_unit_offset, cfg.sandwich_norms, cfg.scale_embeddings) == \
        ("gelu_pytorch_tanh", True, True, True)
    assert cfg.attention_scale == 256 ** -0.5


def test_gemma3_pattern_local_rope_and_ignored_attention_softcap():
    """Every 6th layer full (or `sliding_window_pattern`); local RoPE base 10,000 beside global 1e6;
    attn_logit_softcapping ignored as transformers' Gemma 3 attention ignores it."""
    cfg = config_from_hf({"model_type": "gemma3_text", "attn_logit_softcapping": 9.0, **SHAPE}, "cfg.json")
    assert cfg.local_layers == (True,) * 5 + (False, True)
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.attn_logit_softcapping, cfg.qk_norm) == (1e6, 1e4, None, True)
    every_third = config_from_hf({"model_type": "gemma3_text", "sliding_window_pattern": 3, **SHAPE}, "c")
    assert every_third.local_layers == (True, True, False, True, True, False, True)


@pytest.mark.parametrize("field,value", [("query_pre_attn_scalar", 64), ("final_logit_softcapping", 30.0),
                                         ("hidden_activation", "gelu_pytorch_tanh")])
def test_gemma_fields_are_refused_in_other_families(field, value):
    with pytest.raises(CheckpointError, match=rf"cfg.json: unsupported config field\(s\) \['{field}'\]"):
        config_from_hf({"model_type": "llama", field: value, **SHAPE}, "cfg.json")


def test_gemma_switches_belong_to_their_family():
    with pytest.raises(ValueError, match="llama: sandwich_norms=True, the family has False"):
        LlamaConfig(**SHAPE, sandwich_norms=True)
    with pytest.raises(ValueError, match="gemma2: hidden_act='silu'"):
        preset("gemma2_9b", hidden_act="silu")
    with pytest.raises(ValueError, match="rope_local_theta do not exist in this family"):
        preset("gemma2_9b", rope_local_theta=1e4)
    with pytest.raises(ValueError, match="layer_types must give one of"):
        preset("gemma3_270m", layer_types=("full_attention",))


def test_attention_implementations_that_cannot_express_gemma_refuse_it():
    with pytest.raises(ValueError, match="'splash' expresses causal \\+ padding masks only"):
        preset("gemma3_270m", attention="splash")
    with pytest.raises(ValueError, match="'dot_product' has no attention-logit soft-capping"):
        preset("gemma2_9b", attention="dot_product")
    assert preset("gemma3_270m", attention="dot_product").attention == "dot_product"  # windows: a mask


def test_presets_have_the_published_sizes():
    assert round(preset("gemma3_270m").num_params() / 1e6) == 268
    assert round(preset("gemma2_9b").num_params() / 1e9, 2) == 9.24
    assert preset("gemma2_9b").to_hf_dict()["layer_types"][:2] == ["sliding_attention", "full_attention"]
