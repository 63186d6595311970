"""llama2.c legacy checkpoints (e.g. stories260K): an int32 header and float32 tensors in a fixed order.

Q/K are stored in Meta's interleaved RoPE layout and are seen in HF's rotate-half layout (as HF's
convert_llama_weights_to_hf does); the two precomputed RoPE tables are skipped (RoPE is recomputed).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from notellm_jax.errors import CheckpointError, MissingInputError
from notellm_jax.weights.lazy import ArrayTensor, LazyState, rope_to_rotate_half

logger = logging.getLogger(__name__)

_LLAMA2C_HEADER = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")


def _llama2c_layout(h: dict[str, int], shared: bool) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name or skipped table, shape) in file order; '{i}' entries are stored for all layers at once."""
    dim, hidden, vocab = h["dim"], h["hidden_dim"], h["vocab_size"]
    head_dim = dim // h["n_heads"]
    kv_dim = h["n_kv_heads"] * head_dim
    layer = "model.layers.{i}."
    layout = [("model.embed_tokens.weight", (vocab, dim)),
              (layer + "input_layernorm.weight", (dim,)),
              (layer + "self_attn.q_proj.weight", (dim, dim)),
              (layer + "self_attn.k_proj.weight", (kv_dim, dim)),
              (layer + "self_attn.v_proj.weight", (kv_dim, dim)),
              (layer + "self_attn.o_proj.weight", (dim, dim)),
              (layer + "post_attention_layernorm.weight", (dim,)),
              (layer + "mlp.gate_proj.weight", (hidden, dim)),   # llama2.c w1
              (layer + "mlp.down_proj.weight", (dim, hidden)),   # w2
              (layer + "mlp.up_proj.weight", (hidden, dim)),     # w3
              ("model.norm.weight", (dim,)),
              ("skip:freq_cis_real", (h["seq_len"], head_dim // 2)),
              ("skip:freq_cis_imag", (h["seq_len"], head_dim // 2))]
    if not shared:
        layout.append(("lm_head.weight", (vocab, dim)))
    return layout


def open_llama2c(path: str | Path) -> tuple[LazyState, dict[str, Any]]:
    """llama2.c legacy checkpoint (memory-mapped); a negative vocab_size in the header means an unshared
    classifier."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"llama2.c checkpoint not found: {path}")
    with open(path, "rb") as f:
        raw_header = f.read(4 * len(_LLAMA2C_HEADER))
    if len(raw_header) < 4 * len(_LLAMA2C_HEADER):
        raise CheckpointError(f"{path}: {len(raw_header)} bytes, shorter than the 28-byte llama2.c header")
    h = dict(zip(_LLAMA2C_HEADER, np.frombuffer(raw_header, "<i4").tolist()))
    shared = h["vocab_size"] > 0
    h["vocab_size"] = abs(h["vocab_size"])
    if min(h.values()) <= 0 or h["dim"] % h["n_heads"] or h["n_heads"] % h["n_kv_heads"]:
        raise CheckpointError(f"{path}: not a llama2.c legacy checkpoint (header {h})")
    layout = _llama2c_layout(h, shared)
    n_layers = h["n_layers"]
    counts = [int(np.prod(shape)) * (n_layers if "{i}" in name else 1) for name, shape in layout]
    expected, actual = 4 * (len(_LLAMA2C_HEADER) + sum(counts)), path.stat().st_size
    if actual != expected:
        raise CheckpointError(f"{path}: llama2.c checkpoint with header {h} (shared classifier: {shared}) must be "
                              f"{expected} bytes, the file has {actual} (truncated or not a legacy llama2.c file)")
    flat = np.memmap(path, dtype="<f4", mode="r", offset=4 * len(_LLAMA2C_HEADER))
    state: LazyState = {}
    offset = 0
    for (name, shape), count in zip(layout, counts):
        block = flat[offset:offset + count]
        offset += count
        if name.startswith("skip:"):
            continue
        if "{i}" in name:
            for i, tensor in enumerate(block.reshape(n_layers, *shape)):
                state[name.format(i=i)] = ArrayTensor(tensor)
        else:
            state[name] = ArrayTensor(block.reshape(shape))
    logger.info("%s: skipped the 2 precomputed RoPE tables (freq_cis_real/imag); RoPE is recomputed", path)
    head_dim = h["dim"] // h["n_heads"]
    rope_to_rotate_half(state, n_layers, h["n_heads"], h["n_kv_heads"])
    config = {"model_type": "llama", "vocab_size": h["vocab_size"], "hidden_size": h["dim"],
              "intermediate_size": h["hidden_dim"], "num_hidden_layers": n_layers,
              "num_attention_heads": h["n_heads"], "num_key_value_heads": h["n_kv_heads"], "head_dim": head_dim,
              "max_position_embeddings": h["seq_len"], "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": shared, "bos_token_id": 1, "eos_token_id": 2}
    return state, config
