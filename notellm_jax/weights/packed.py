"""A GGUF's tensors re-packed for hosts without the gguf package, in parts small enough to copy one at a time.

`pack_gguf` (needs gguf) keeps every tensor's raw GGUF bytes (Q4_1 / Q8_0 blocks stay quantised: SmolLM2's
98 MB stay 98 MB) in one byte stream cut into `part-NN.bin` files of at most `part_bytes`, plus
`manifest.json` (HF tensor names, numpy shapes, types, offsets, the HF-style config). `read_packed` needs
numpy alone: it joins the parts and dequantises the GGUF block formats itself (ggml's layouts):
  Q8_0: blocks of 32 = float16 scale d, 32 int8 q;            w = d q
  Q4_1: blocks of 32 = float16 d, float16 m, 16 bytes of nibbles (low nibbles are weights 0-15, high 16-31);
        w = d q + m
and then applies the same interleaved -> rotate-half permutation of q/k as `gguf.open_gguf_state`, so the
state dict is identical to that reader's (tests/integration/test_device_recipe.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from notellm_jax.errors import CheckpointError
from notellm_jax.model.families import LlamaConfig
from notellm_jax.weights.formats import materialise
from notellm_jax.weights.gguf import gguf_config, gguf_hf_name, open_gguf
from notellm_jax.weights.hf import hf_to_params, save_hf
from notellm_jax.weights.lazy import interleaved_to_rotate_half

MANIFEST = "manifest.json"
FORMAT = "notellm_jax.packed_gguf/1"
PART_BYTES = 60 * 2**20  # under a 64 MiB copy limit


def _dequantise(raw: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    if kind == "F32":
        return raw.view(np.float32).reshape(shape)
    if kind == "F16":
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    if kind == "Q8_0":
        blocks = raw.reshape(-1, 34)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
        return (d * q).reshape(shape)
    if kind == "Q4_1":
        blocks = raw.reshape(-1, 20)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        nibbles = blocks[:, 4:]
        q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.float32)
        return (d * q + m).reshape(shape)
    raise CheckpointError(f"packed tensor type {kind} has no numpy dequantiser (F32, F16, Q8_0, Q4_1)")


def pack_gguf(gguf_path: str | Path, out_dir: str | Path, part_bytes: int = PART_BYTES) -> Path:
    """Write `out_dir/manifest.json` and `part-NN.bin` (each at most `part_bytes`)."""
    path = Path(gguf_path)
    reader = open_gguf(path)
    config = gguf_config(reader.fields, path)
    if config["model_type"] != "llama":  # read_packed undoes llama's RoPE layout only
        raise CheckpointError(f"{path}: packing supports llama GGUFs only, not {config['model_type']}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("part-*.bin"):
        stale.unlink()
    tensors, chunks, offset = [], [], 0
    for tensor in reader.tensors:
        raw = np.ascontiguousarray(tensor.data).view(np.uint8).reshape(-1)
        shape = [int(n) for n in reversed(tensor.shape.tolist())]
        tensors.append({"name": gguf_hf_name(tensor.name, path), "type": tensor.tensor_type.name, "shape": shape,
                        "offset": offset, "nbytes": int(raw.size)})
        chunks.append(raw)
        offset += raw.size
    stream = np.concatenate(chunks)
    parts = []
    for index, start in enumerate(range(0, stream.size, part_bytes)):
        name = f"part-{index:02d}.bin"
        stream[start:start + part_bytes].tofile(out_dir / name)
        parts.append(name)
    config["tie_word_embeddings"] = not any(t["name"] == "lm_head.weight" for t in tensors)
    manifest = {"format": FORMAT, "source": path.name, "config": config, "parts": parts, "total_bytes": int(offset),
                "tensors": tensors}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out_dir


def read_packed(folder: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """(HF-named float32 state dict, HF-style config) from a packed folder; numpy only."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST} (not a packed GGUF folder)")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    missing = [p for p in manifest["parts"] if not (folder / p).is_file()]
    if missing:
        raise CheckpointError(f"{folder}: missing parts {missing} (copy every part-NN.bin listed in {MANIFEST})")
    stream = np.concatenate([np.fromfile(folder / p, np.uint8) for p in manifest["parts"]])
    if stream.size != manifest["total_bytes"]:
        raise CheckpointError(f"{folder}: parts hold {stream.size} bytes, the manifest says {manifest['total_bytes']}")
    config = manifest["config"]
    state = {}
    for t in manifest["tensors"]:
        raw = stream[t["offset"]:t["offset"] + t["nbytes"]]
        state[t["name"]] = np.ascontiguousarray(_dequantise(raw, t["type"], tuple(t["shape"])), np.float32)
    for i in range(config["num_hidden_layers"]):
        for proj, heads in (("q_proj", config["num_attention_heads"]), ("k_proj", config["num_key_value_heads"])):
            key = f"model.layers.{i}.self_attn.{proj}.weight"
            if key in state:
                state[key] = interleaved_to_rotate_half(state[key], heads)
    return state, config


def packed_to_hf(folder: str | Path, out_dir: str | Path) -> Path:
    """A packed folder -> an HF folder (config.json + model.safetensors) that `load_params` reads."""
    state, config = read_packed(folder)
    cfg = LlamaConfig.from_hf_dict(config)
    return save_hf(materialise(hf_to_params(state, cfg, source=str(folder))), cfg, out_dir)
