"""LLaMA-3 (RoPE scaling), Qwen2/2.5 (q/k/v biases), Qwen3 (q/k norms), Mistral (sliding window) and Gemma 2 / 3
(GeGLU, (1 + scale) norms, four norms a block, scaled embeddings, soft-capping, local/global layers, two RoPE
bases) against Hugging Face transformers + torch: tiny random models of each family built with transformers, saved with
`save_pretrained`, loaded through `load_causal_lm`, exported back with `save_hf` and reloaded in torch."""
from __future__ import annotations

import json

import numpy as np
import pytest

import notellm_jax  # noqa: F401
import torch
import transformers
from decode_reference import greedy_by_recomputation, padded_batch as padded_prompts

from notellm_jax.errors import CheckpointError
from notellm_jax.model.decode import CausalLM
from notellm_jax.weights.formats import load_causal_lm
from notellm_jax.weights.hf import save_hf

VOCAB, LENGTH, PAD = 97, 40, 0
# Rows: unpadded (positions 0..39), right-padded (30 real), left-padded (27 real).
REAL = [slice(0, LENGTH), slice(0, 30), slice(LENGTH - 27, LENGTH)]
CLASSES = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
           "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
           "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM)}
GEMMA = ("gemma2", "gemma3_text")
# head_dim 16, theta 1e4: wavelengths 6.3, 20, 63, 199, ...; with an original context of 32 (high/low
# frequency factors 4/1) the first is kept, the second interpolated, the rest divided by the factor.
# Row 0 reaches position 39, beyond the original context.
LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
LLAMA3_B = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0,
            "original_max_position_embeddings": 16}

# (name, family, HF config kwargs, what to check beyond parity): GQA and MHA, tied and untied, scaling
# on/off, odd head counts, explicit head_dim, biases, a window shorter and one longer than the sequence.
CASES = [
    ("llama3_gqa_untied", "llama", dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                        intermediate_size=48, tie_word_embeddings=False, rope_scaling=LLAMA3),
     {"decode", "scaling"}),
    ("llama3_mha_tied_bias", "llama", dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=3,
                                           intermediate_size=64, tie_word_embeddings=True, attention_bias=True,
                                           rope_scaling=LLAMA3_B), {"scaling"}),
    ("llama_rope_type_default", "llama", dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                              intermediate_size=48, rope_scaling={"rope_type": "default"},
                                              tie_word_embeddings=False), set()),
    ("qwen2_gqa_tied", "qwen2", dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                                     intermediate_size=80, rope_theta=1e6, tie_word_embeddings=True), {"decode"}),
    ("qwen2_odd_mha_untied", "qwen2", dict(hidden_size=24, num_attention_heads=3, num_key_value_heads=3,
                                           intermediate_size=40, tie_word_embeddings=False), {"sharded"}),
    ("qwen3_gqa_untied_head_dim", "qwen3", dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                                head_dim=16, intermediate_size=48, tie_word_embeddings=False),
     {"decode", "sharded"}),
    ("qwen3_odd_tied_bias", "qwen3", dict(hidden_size=24, num_attention_heads=3, num_key_value_heads=1, head_dim=8,
                                          intermediate_size=40, tie_word_embeddings=True, attention_bias=True), set()),
    ("mistral_window5_gqa", "mistral", dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                            intermediate_size=48, sliding_window=5, tie_word_embeddings=False),
     {"decode", "window"}),
    # Gemma: 3 layers (sliding, full, sliding unless given); soft-capping on and off; windows shorter and
    # longer than the sequence; an attention scalar other than head_dim; Gemma 3's linear-scaled global RoPE.
    # Gemma 3's attention ignores attn_logit_softcapping (as transformers' does); its final soft-cap is real.
    ("gemma2_softcap_window5_gqa", "gemma2", dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                                  head_dim=16, intermediate_size=48, sliding_window=5,
                                                  query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                                                  final_logit_softcapping=3.0, tie_word_embeddings=True),
     {"decode", "window", "softcap", "gemma"}),
    ("gemma2_no_softcap_untied_long_window", "gemma2", dict(
        hidden_size=24, num_attention_heads=3, num_key_value_heads=1, head_dim=8, intermediate_size=40,
        sliding_window=64, attn_logit_softcapping=None, final_logit_softcapping=None, query_pre_attn_scalar=8,
        tie_word_embeddings=False), {"sharded"}),
    ("gemma3_linear_rope_window5", "gemma3_text", dict(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=48,
        sliding_window=5, query_pre_attn_scalar=16, rope_theta=1e4, rope_local_base_freq=100.0,
        rope_scaling={"rope_type": "linear", "factor": 4.0}, tie_word_embeddings=True,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
     {"decode", "window", "scaling", "gemma"}),
    ("gemma3_softcap_mha_pattern2", "gemma3_text", dict(
        hidden_size=32, num_attention_heads=2, num_key_value_heads=2, head_dim=24, intermediate_size=48,
        sliding_window=7, sliding_window_pattern=2, query_pre_attn_scalar=20, attn_logit_softcapping=3.0,
        final_logit_softcapping=5.0, tie_word_embeddings=True), {"softcap"}),
    ("mistral_no_window_mha_tied", "mistral", dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                                                   head_dim=24, intermediate_size=48, sliding_window=None,
                                                   tie_word_embeddings=True), set()),
]


def torch_model(family: str, seed: int, **shape) -> transformers.PreTrainedModel:
    """A random tiny model whose every weight (norm scales and biases included) differs from its init, so
    a swapped, transposed or ignored tensor cannot go unnoticed."""
    config_cls, model_cls = CLASSES[family]
    torch.manual_seed(seed)
    gemma = dict(num_hidden_layers=3, pad_token_id=0, attn_implementation="eager") if family in GEMMA else {}
    cfg = config_cls(**{"vocab_size": VOCAB, "num_hidden_layers": 2, "max_position_embeddings": 128,
                        "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2, **gemma, **shape})
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return model


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(ids, np.int64))).logits.float().numpy()


def padded_batch(seed: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.default_rng(seed).integers(3, VOCAB, size=(len(REAL), LENGTH))
    mask = np.zeros_like(ids)
    for row, keep in enumerate(REAL):
        mask[row, keep] = 1
    return np.where(mask > 0, ids, PAD), mask


def assert_matches_torch(lm: CausalLM, model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Each row's real positions vs torch on that row alone, unpadded (so padding semantics are ours)."""
    ours = lm.logits(ids, mask)
    for row, keep in enumerate(REAL):
        np.testing.assert_allclose(ours[row, keep], torch_logits(model, ids[None, row, keep])[0],
                                   atol=1e-4, rtol=0, err_msg=f"row {row}")
    return ours


def assert_cached_decode_equals_recomputation(lm: CausalLM, seed: int) -> None:
    """Prompts of 30 and 19 tokens plus 14 new ones: past the LLaMA-3 original context (32) and far past
    Mistral's window (5); left and right padding."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, VOCAB, 30).tolist(), rng.integers(3, VOCAB, 19).tolist()]
    n_new, length = 14, 30
    expected = [greedy_by_recomputation(lm, p, n_new, length + n_new) for p in prompts]
    for side in ("left", "right"):
        ids, mask = padded_prompts(prompts, length, side)
        out = lm.generate(ids, n_new, attention_mask=mask, eos_id=-1)
        assert out[:, length:].tolist() == expected, side


# Cases that also decode compile two more programs (~30 s on the shared 2-core machine): slow.
@pytest.mark.parametrize("name,family,shape,checks", [
    pytest.param(*case, marks=[pytest.mark.slow] if "decode" in case[3] else []) for case in CASES],
    ids=[c[0] for c in CASES])
def test_family_parity_export_and_decode(tmp_path, name, family, shape, checks):
    model = torch_model(family, len(name), **shape)
    shard = "20KB" if "sharded" in checks else "10GB"
    model.save_pretrained(tmp_path / "hf", safe_serialization=True, max_shard_size=shard)
    assert ("sharded" in checks) == (len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 2)
    lm = load_causal_lm(tmp_path / "hf")
    cfg = lm.config
    assert (cfg.model_type, cfg.tie_word_embeddings) == (family, shape["tie_word_embeddings"])
    assert cfg.attention_bias == (family == "qwen2" or shape.get("attention_bias", False))
    assert cfg.qk_norm == (family in ("qwen3", "gemma3_text"))
    ids, mask = padded_batch(len(name))
    ours = assert_matches_torch(lm, model, ids, mask)

    # The feature under test really changes the output (so parity is not vacuous for it).
    assert_feature_changes_output(lm, ours, ids, mask, checks)

    save_hf(lm.params, cfg, tmp_path / "export")
    # eager: transformers' sdpa path drops Gemma 2's attention-logit soft-capping
    eager = {"attn_implementation": "eager"} if family in GEMMA else {}
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", **eager).eval()
    assert type(reloaded) is type(model)
    np.testing.assert_allclose(torch_logits(reloaded, ids[:1]), torch_logits(model, ids[:1]), atol=1e-6, rtol=0)
    if "decode" in checks:
        assert_cached_decode_equals_recomputation(lm, len(name))
    if "gemma" in checks:
        assert_gemma_runtime_variants(lm, model, tmp_path / "hf", ids, mask, ours)


def assert_feature_changes_output(lm: CausalLM, ours: np.ndarray, ids, mask, checks: set[str]) -> None:
    """The feature under test really changes the output (so parity is not vacuous for it)."""
    cfg = lm.config
    if "scaling" in checks:
        assert cfg.rope_type == "linear" or (cfg.rope_type == "llama3" and cfg.rope_original_max_position < LENGTH)
        plain = CausalLM(lm.params, cfg.replace(rope_type="default")).logits(ids, mask)
        assert np.abs(plain[0] - ours[0]).max() > 1e-2
    if "window" in checks:
        assert cfg.sliding_window == 5
        full = CausalLM(lm.params, cfg.replace(sliding_window=None)).logits(ids, mask)
        np.testing.assert_allclose(full[0, :5], ours[0, :5], atol=1e-5)  # within the window: the same
        assert np.abs(full[0, 5:] - ours[0, 5:]).max() > 1e-2
    if "softcap" in checks:
        assert cfg.final_logit_softcapping and (cfg.attn_logit_softcapping is None) == (cfg.model_type != "gemma2")
        assert np.abs(ours).max() < cfg.final_logit_softcapping
        uncapped = CausalLM(lm.params, cfg.replace(attn_logit_softcapping=None, final_logit_softcapping=None))
        assert np.abs(uncapped.logits(ids, mask)[0] - ours[0]).max() > 1e-2


def assert_gemma_runtime_variants(lm: CausalLM, model, folder, ids, mask, ours: np.ndarray) -> None:
    """Greedy generation equal to transformers'; scanned layers with remat (the local/global flag is scanned
    data), and `dot_product` where the config allows it, give the same logits; splash is refused."""
    prompt = ids[:1, :12]
    with torch.no_grad():
        expected = model.generate(torch.from_numpy(prompt.astype(np.int64)), max_new_tokens=10, do_sample=False,
                                  min_new_tokens=10, eos_token_id=None, pad_token_id=PAD).numpy()
    np.testing.assert_array_equal(lm.generate(prompt, 10, eos_id=-1), expected)
    scanned = load_causal_lm(folder, scan_layers=True, remat_policy="full")
    np.testing.assert_allclose(scanned.logits(ids, mask), ours, atol=1e-4, rtol=0)
    if lm.config.attn_logit_softcapping is None:
        dot = CausalLM(lm.params, lm.config.replace(attention="dot_product")).logits(ids, mask)
        np.testing.assert_allclose(dot, ours, atol=1e-5, rtol=0)
    else:
        with pytest.raises(ValueError, match="soft-capping"):
            lm.config.replace(attention="dot_product")
    with pytest.raises(ValueError, match="splash"):
        lm.config.replace(attention="splash")


UNSUPPORTED = [
    ("llama", "rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_scaling.rope_type='yarn'"),
    ("llama", "rope_scaling", {"type": "dynamic", "factor": 2.0}, "rope_scaling.rope_type='dynamic'"),
    ("llama", "rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "rope_scaling \\(llama3\\) lacks"),
    ("llama", "mlp_bias", True, "mlp_bias=True"),
    ("llama", "model_type", "gemma", "model_type='gemma'"),
    ("qwen2", "use_sliding_window", True, "use_sliding_window=True"),
    ("qwen3", "layer_types", ["full_attention", "sliding_attention"], "layer_types="),
    ("mistral", "hidden_act", "gelu", "hidden_act='gelu'"),
    ("qwen3", "partial_rotary_factor", 0.5, "partial_rotary_factor=0.5"),
    ("gemma2", "hidden_activation", "gelu", "hidden_activation='gelu'"),
    ("gemma3_text", "use_bidirectional_attention", True, "use_bidirectional_attention=True"),
    ("gemma3_text", "layer_types", ["chunked_attention"] * 3, "layer_types="),
]


@pytest.mark.parametrize("family,field,value,message", UNSUPPORTED, ids=[f"{u[0]}-{u[1]}" for u in UNSUPPORTED])
def test_unsupported_fields_name_the_field_and_the_path(tmp_path, family, field, value, message):
    torch_model(family, 1, hidden_size=16, num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                intermediate_size=24).save_pretrained(tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"{tmp_path.name}.*{message}"):
        load_causal_lm(tmp_path)


# llama.cpp's tensor names for Gemma (convert_hf_to_gguf.py / gguf-py's tensor map), written independently of
# notellm_jax.weights.gguf: HF suffix -> GGUF suffix.
GGUF_GEMMA_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_gemma_gguf(model, path, arch: str) -> None:
    """What llama.cpp's converter writes for a Gemma model: float32 tensors under its names, every RMSNorm
    weight stored as 1 + w, Q/K left in rotate-half order, the metadata its loader reads."""
    import gguf
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    for add, value in ((writer.add_block_count, cfg.num_hidden_layers), (writer.add_vocab_size, cfg.vocab_size),
                       (writer.add_context_length, cfg.max_position_embeddings),
                       (writer.add_embedding_length, cfg.hidden_size),
                       (writer.add_feed_forward_length, cfg.intermediate_size),
                       (writer.add_head_count, cfg.num_attention_heads),
                       (writer.add_head_count_kv, cfg.num_key_value_heads), (writer.add_key_length, cfg.head_dim),
                       (writer.add_value_length, cfg.head_dim), (writer.add_layer_norm_rms_eps, cfg.rms_norm_eps),
                       (writer.add_rope_freq_base, cfg.rope_theta), (writer.add_sliding_window, cfg.sliding_window),
                       (writer.add_bos_token_id, 1), (writer.add_eos_token_id, 2)):
        add(value)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    for name, tensor in model.state_dict().items():
        data = tensor.float().numpy() + (1.0 if name.endswith("norm.weight") else 0.0)
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers."):].split(".", 1)
            name = f"blk.{i}.{GGUF_GEMMA_NAMES[rest.removesuffix('.weight')]}.weight"
        else:
            name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                    "lm_head.weight": None}[name]
        if name is not None:  # the tied head is the embedding
            writer.add_tensor(name, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch,family,shape", [
    ("gemma2", "gemma2", dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              intermediate_size=48, sliding_window=5, query_pre_attn_scalar=16,
                              attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    ("gemma3", "gemma3_text", dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                   intermediate_size=48, sliding_window=6, query_pre_attn_scalar=16,
                                   num_hidden_layers=7, rope_local_base_freq=10000.0, rope_theta=1e6))])
def test_gemma_gguf_matches_transformers(tmp_path, arch, family, shape):
    """A Gemma GGUF as llama.cpp writes it (its default layer pattern: every 2nd / 6th layer full) loads with
    the logits of the transformers model it was written from."""
    model = torch_model(family, 3, tie_word_embeddings=True, **shape)
    write_gemma_gguf(model, tmp_path / "m.gguf", arch)
    lm = load_causal_lm(tmp_path / "m.gguf")
    assert lm.config.model_type == family and lm.config.layer_types == tuple(model.config.layer_types)
    ids, mask = padded_batch(5)
    assert_matches_torch(lm, model, ids, mask)
