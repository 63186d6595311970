"""Malformed weights: every broken config or file is a CheckpointError naming the path and the field or
byte offset; HF's `rope_type: default` (= no scaling) loads as plain RoPE; unknown fields are refused."""
from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from numpy_params import numpy_params

import notellm_jax  # noqa: F401
from notellm_jax.errors import CheckpointError
from notellm_jax.model.families import preset
from notellm_jax.model.params import init_params
from notellm_jax.weights.formats import load_causal_lm, load_params
from notellm_jax.weights.hf import save_hf
from notellm_jax.weights.orbax import save_orbax

IDS = np.array([[1, 7, 42, 99, 3, 250]])


@pytest.fixture(scope="module")
def tiny():
    cfg = preset("tiny", tie_word_embeddings=True)
    return numpy_params(lambda key: init_params(cfg, key), jax.random.key(0)), cfg


@pytest.fixture
def hf_dir(tiny, tmp_path) -> Path:
    return save_hf(*tiny, tmp_path / "hf")


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes,message", [
    ({"num_key_value_heads": 0}, "config field num_key_value_heads=0 must be a positive integer"),
    ({"num_key_value_heads": 3}, "config field num_key_value_heads=3 does not divide num_attention_heads=4"),
    ({"num_attention_heads": -4}, "config field num_attention_heads=-4 must be a positive integer"),
    ({"hidden_size": "64"}, "config field hidden_size='64' must be a positive integer"),
    ({"num_hidden_layers": True}, "config field num_hidden_layers=True must be a positive integer"),
    ({"partial_rotary_factor": 0.5}, "unsupported config field partial_rotary_factor=0.5"),
    ({"attention_dropout": 0.1}, "unsupported config field attention_dropout=0.1"),
    ({"attn_logit_softcapping": 30.0}, r"unsupported config field\(s\) \['attn_logit_softcapping'\]"),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else None)
def test_malformed_hf_config_names_path_and_field(hf_dir, changes, message):
    _edit_config(hf_dir, **changes)
    with pytest.raises(CheckpointError, match=re.escape(str(hf_dir)) + ": " + message):
        load_params(hf_dir)


def test_rope_type_default_is_plain_rope(tiny, hf_dir):
    reference = load_causal_lm(hf_dir).logits(IDS)
    _edit_config(hf_dir, rope_scaling={"rope_type": "default"}, partial_rotary_factor=1.0, attention_dropout=0.0)
    np.testing.assert_array_equal(load_causal_lm(hf_dir).logits(IDS), reference)


# ----------------------------------------------------------------------------- GGUF


def _write_gguf(path: Path, n_heads: int = 4) -> bytes:
    import gguf
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_head_count(n_heads)
    writer.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def test_gguf_cut_inside_its_header_names_the_offset(tmp_path):
    data = _write_gguf(tmp_path / "whole.gguf")
    cuts = {10: r"cut at byte offset 8 inside the header \(a 8-byte value",
            40: r"cut at byte offset \d+ inside metadata (entry 0 of 4|value 'general.architecture')",
            len(data) - 200: r"cut at byte offset \d+ inside (metadata|tensor info)",
            len(data) - 1: r"tensor 'token_embd.weight' data spans byte offsets \d+\.\.\d+, past the end of the "
                           rf"{len(data) - 1}-byte file"}
    for cut, detail in cuts.items():
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}: unreadable GGUF file, truncated or "
                                                  rf"corrupt \({detail}"):
            load_params(path)


def test_gguf_with_zero_heads(tmp_path):
    path = tmp_path / "zero.gguf"
    _write_gguf(path, n_heads=0)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}: GGUF field llama.attention.head_count=0 "
                                              "must be a positive integer"):
        load_params(path)


# ----------------------------------------------------------------------------- orbax


def test_orbax_folder_of_another_shape_names_the_path(tiny, tmp_path):
    folder = save_orbax(*tiny, tmp_path / "orbax")
    other = preset("tiny", tie_word_embeddings=True, intermediate_size=96)
    (folder / "config.json").write_text(json.dumps(other.to_hf_dict()))
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(folder / 'params'))}: parameters do not match "
                                              r".*config.json: shapes \['layers_0/mlp/down_proj/kernel \(128, 64\) "
                                              r"\(config.json implies \(96, 64\)\)'"):
        load_params(folder)
    deeper = preset("tiny", tie_word_embeddings=True, num_hidden_layers=5)
    (folder / "config.json").write_text(json.dumps(deeper.to_hf_dict()))
    with pytest.raises(CheckpointError, match=r"missing \['layers_4/"):
        load_params(folder)
    (folder / "config.json").write_text(json.dumps(tiny[1].to_hf_dict()))
    jax.tree.map(np.testing.assert_array_equal, load_params(folder)[0], tiny[0])
