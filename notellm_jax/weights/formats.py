"""Weights in and out of the project's Flax LLaMA (`notellm_jax.model.llama`).

Every reader turns its format into the same intermediate, a Hugging Face-named float32 numpy state dict
(`model.layers.0.self_attn.q_proj.weight`, ...) plus an HF config.json dict. One function maps that to
the Flax parameter tree (`hf_to_params`) and one maps back (`params_to_hf`), so layout logic lives in
one place whatever the source:

- Hugging Face folder: config.json + model.safetensors, or shards listed in model.safetensors.index.json.
- llama2.c legacy .bin (e.g. stories260K): int32 header + float32 tensors, Q/K in Meta's interleaved
  RoPE layout (un-permuted to HF's rotate-half layout, as HF's convert_llama_weights_to_hf does).
- GGUF (e.g. SmolLM2-135M-Instruct.Q4_1): dequantised with the `gguf` package; llama.cpp stores Q/K
  in the same interleaved layout.
- orbax folder: config.json + `params/` written by `save_orbax` (the project's own format).

Public API: `load_causal_lm(path) -> CausalLM` (logits, greedy generate with the KV cache),
`load_params(path) -> (params, LlamaConfig)`, `save_hf`, `save_orbax`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from notellm_jax.model.decode import CausalLM
from notellm_jax.model.llama import LlamaConfig
from notellm_jax.model.params import stack_layers, unstack_layers
from notellm_jax.errors import CheckpointError, MissingInputError

logger = logging.getLogger(__name__)

StateDict = dict[str, np.ndarray]
Params = dict[str, Any]

HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
ORBAX_PARAMS = "params"


# ----------------------------------------------------------------------------------------------------
# Format detection


def detect_format(path: str | Path) -> str:
    """One of "hf", "llama2c", "gguf", "orbax" for `path`, from folder contents or file magic; clear errors otherwise."""
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"checkpoint not found: {path}")
    if path.is_dir():
        names = {p.name for p in path.iterdir()}
        if "config.json" in names and (HF_WEIGHTS in names or HF_INDEX in names):
            return "hf"
        if "config.json" in names and (path / ORBAX_PARAMS).is_dir():
            return "orbax"
        raise CheckpointError(
            f"{path}: folder is neither a Hugging Face checkpoint (config.json + {HF_WEIGHTS} or {HF_INDEX}) "
            f"nor an orbax checkpoint (config.json + {ORBAX_PARAMS}/); it holds: {', '.join(sorted(names)) or 'nothing'}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return "gguf"
    if path.suffix == ".gguf":
        raise CheckpointError(f"{path}: .gguf file without the GGUF magic (starts with {magic!r})")
    if magic[:2] == b"PK" or magic[:1] == b"\x80":
        raise CheckpointError(f"{path}: looks like a PyTorch pickle/zip checkpoint; only safetensors are read "
                              "(re-save it with save_pretrained(safe_serialization=True))")
    if path.suffix == ".bin":
        return "llama2c"
    raise CheckpointError(f"{path}: unknown checkpoint format (expected an HF or orbax folder, a llama2.c "
                          ".bin or a .gguf file)")


# ----------------------------------------------------------------------------------------------------
# Readers: each returns (HF-named float32 state dict, HF config dict)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MissingInputError(f"missing {path.name} in {path.parent}")
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _as_float32(name: str, array: np.ndarray, source: Path) -> np.ndarray:
    if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
        raise CheckpointError(f"{source}: tensor {name} has dtype {array.dtype}, expected a float type")
    return np.asarray(array, dtype=np.float32)


def _read_safetensors(path: Path) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not path.is_file():
        raise MissingInputError(f"missing safetensors file {path}")
    try:
        raw = load_file(path)
    except SafetensorError as e:
        raise CheckpointError(f"{path}: unreadable safetensors file, truncated or corrupt ({e})") from e
    return {name: _as_float32(name, array, path) for name, array in raw.items()}


def read_hf_folder(folder: str | Path) -> tuple[StateDict, dict[str, Any]]:
    """config.json + model.safetensors, or the shards named by model.safetensors.index.json."""
    folder = Path(folder)
    config = _read_json(folder / "config.json")
    if not (folder / HF_INDEX).is_file():
        return _read_safetensors(folder / HF_WEIGHTS), config
    weight_map = _read_json(folder / HF_INDEX).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{folder / HF_INDEX}: no weight_map")
    state: StateDict = {}
    for shard in sorted(set(weight_map.values())):
        tensors = _read_safetensors(folder / shard)
        misplaced = sorted(n for n, f in weight_map.items() if f == shard and n not in tensors)
        if misplaced:
            raise CheckpointError(f"{folder / shard}: lacks tensors the index assigns to it: {misplaced[:5]}")
        state.update(tensors)
    return state, config


def interleaved_to_rotate_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Q/K rows from Meta's interleaved RoPE pairs (llama2.c, llama.cpp) to HF's rotate-half halves."""
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


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


def read_llama2c(path: str | Path) -> tuple[StateDict, dict[str, Any]]:
    """llama2.c legacy checkpoint; a negative vocab_size in the header means an unshared classifier."""
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
    flat = np.fromfile(path, dtype="<f4", offset=4 * len(_LLAMA2C_HEADER))
    state: StateDict = {}
    offset = 0
    for (name, shape), count in zip(layout, counts):
        block = flat[offset:offset + count]
        offset += count
        if name.startswith("skip:"):
            continue
        if "{i}" in name:
            for i, tensor in enumerate(block.reshape(n_layers, *shape)):
                state[name.format(i=i)] = tensor
        else:
            state[name] = block.reshape(shape)
    logger.info("%s: skipped the 2 precomputed RoPE tables (freq_cis_real/imag); RoPE is recomputed", path)
    head_dim = h["dim"] // h["n_heads"]
    for i in range(n_layers):
        for proj, heads in (("q_proj", h["n_heads"]), ("k_proj", h["n_kv_heads"])):
            key = f"model.layers.{i}.self_attn.{proj}.weight"
            state[key] = interleaved_to_rotate_half(state[key], heads)
    config = {"model_type": "llama", "vocab_size": h["vocab_size"], "hidden_size": h["dim"],
              "intermediate_size": h["hidden_dim"], "num_hidden_layers": n_layers,
              "num_attention_heads": h["n_heads"], "num_key_value_heads": h["n_kv_heads"], "head_dim": head_dim,
              "max_position_embeddings": h["seq_len"], "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": shared, "bos_token_id": 1, "eos_token_id": 2}
    return state, config


_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GGUF_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.weight$")


def _gguf_hf_name(name: str, path: Path) -> str:
    match = _GGUF_LAYER.match(name)
    if match and match.group(2) in _GGUF_LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_GGUF_LAYER_NAMES[match.group(2)]}.weight"
    if name in _GGUF_NAMES:
        return _GGUF_NAMES[name]
    raise CheckpointError(f"{path}: GGUF tensor {name!r} is not part of the supported LLaMA architecture")


@functools.lru_cache(maxsize=2)
def _cached_gguf_reader(path: str, mtime_ns: int):
    import gguf
    return gguf.GGUFReader(path)


def open_gguf(path: str | Path):
    """A `gguf.GGUFReader` for `path`, parsed once per process (the tokenizer and the weights both read it;
    parsing SmolLM2's 49k-token vocabulary takes seconds)."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"GGUF file not found: {path}")
    try:
        return _cached_gguf_reader(str(path.absolute()), path.stat().st_mtime_ns)
    except (ValueError, OSError, IndexError, KeyError) as e:
        where = gguf_damage(path)
        detail = where or f"{type(e).__name__}: {e}"
        raise CheckpointError(f"{path}: unreadable GGUF file, truncated or corrupt ({detail})") from e


# GGUF metadata value types: struct format of the scalar ones; 8 = string, 9 = array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


class _GGUFCursor:
    """Bounds-checked little-endian reads over a GGUF file's bytes; `what` names the part being read."""

    def __init__(self, data: bytes):
        self.data, self.offset, self.what = data, 0, "magic"

    def read(self, fmt: str):
        import struct
        size = struct.calcsize("<" + fmt)
        if self.offset + size > len(self.data):
            raise EOFError(f"cut at byte offset {self.offset} inside {self.what} (a {size}-byte value, the file "
                           f"has {len(self.data)} bytes)")
        value = struct.unpack_from("<" + fmt, self.data, self.offset)[0]
        self.offset += size
        return value

    def string(self) -> str:
        length = self.read("Q")
        if self.offset + length > len(self.data):
            raise EOFError(f"cut at byte offset {self.offset} inside {self.what} (a {length}-byte string, the file "
                           f"has {len(self.data)} bytes)")
        self.offset += length
        return self.data[self.offset - length:self.offset].decode("utf-8", "replace")

    def value(self, kind: int) -> None:
        if kind == 8:
            self.string()
        elif kind == 9:
            item, count = self.read("I"), self.read("Q")
            for _ in range(count):
                self.value(item)
        elif kind in _GGUF_SCALARS:
            self.read(_GGUF_SCALARS[kind])
        else:
            raise EOFError(f"unknown metadata value type {kind} at byte offset {self.offset - 4} in {self.what}")


def gguf_damage(path: Path) -> str | None:
    """Where a GGUF file is cut or broken ('cut at byte offset N inside <part> ...'), or None if its header,
    tensor table and tensor data bounds are all intact. Only called once the reader has failed."""
    import mmap

    size = path.stat().st_size
    if size < 4:
        return f"cut at byte offset {size} inside the magic (the file has {size} bytes)"
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF":
            return f"no GGUF magic at byte offset 0 (starts with {data[:4]!r})"
        cursor = _GGUFCursor(data)
        cursor.offset, cursor.what = 4, "the header"
        try:
            tensors, alignment = _gguf_tables(cursor)
        except EOFError as e:
            return str(e)
        return _gguf_data_damage(tensors, -(-cursor.offset // alignment) * alignment, size)


def _gguf_tables(cursor: _GGUFCursor) -> tuple[list[tuple[str, list[int], int, int]], int]:
    """Walk the header, metadata and tensor table: ([(name, dims, type, data offset)], alignment)."""
    _, n_tensors, n_kv = cursor.read("I"), cursor.read("Q"), cursor.read("Q")
    alignment = 32
    for i in range(n_kv):
        cursor.what = f"metadata entry {i} of {n_kv}"
        key = cursor.string()
        cursor.what = f"metadata value {key!r}"
        kind = cursor.read("I")
        if key == "general.alignment" and kind == 4:
            alignment = cursor.read("I")
        else:
            cursor.value(kind)
    tensors = []
    for i in range(n_tensors):
        cursor.what = f"tensor info {i} of {n_tensors}"
        name = cursor.string()
        cursor.what = f"tensor info {name!r}"
        dims = [cursor.read("Q") for _ in range(cursor.read("I"))]
        tensors.append((name, dims, cursor.read("I"), cursor.read("Q")))
    return tensors, alignment


def _gguf_data_damage(tensors: list[tuple[str, list[int], int, int]], start: int, size: int) -> str | None:
    import gguf

    known = {int(t) for t in gguf.GGMLQuantizationType}
    for name, dims, kind, offset in tensors:
        if kind not in known:
            return f"tensor {name!r} has unknown type {kind}"
        block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
        end = start + offset + int(np.prod(dims)) // block * block_bytes
        if end > size:
            return (f"tensor {name!r} data spans byte offsets {start + offset}..{end}, past the end of the "
                    f"{size}-byte file")
    return None


def gguf_field(fields: dict, key: str, path: Path, default: Any = ...) -> Any:
    """A metadata value of a GGUF file; without `default`, a missing key is a CheckpointError."""
    if key not in fields:
        if default is ...:
            raise CheckpointError(f"{path}: GGUF metadata lacks {key}")
        return default
    return fields[key].contents()


def _gguf_config(fields: dict, path: Path) -> dict[str, Any]:
    arch = gguf_field(fields, "general.architecture", path)
    if arch != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    scaling = gguf_field(fields, "llama.rope.scaling.type", path, "none")
    if scaling != "none":
        raise CheckpointError(f"{path}: unsupported GGUF field llama.rope.scaling.type={scaling!r}")
    n_heads = gguf_field(fields, "llama.attention.head_count", path)
    hidden = gguf_field(fields, "llama.embedding_length", path)
    if not isinstance(n_heads, int | np.integer) or n_heads <= 0:
        raise CheckpointError(f"{path}: GGUF field llama.attention.head_count={n_heads!r} must be a positive integer")
    head_dim = gguf_field(fields, "llama.attention.key_length", path, hidden // n_heads)
    rope_dims = gguf_field(fields, "llama.rope.dimension_count", path, head_dim)
    if rope_dims != head_dim:
        raise CheckpointError(f"{path}: partial RoPE (llama.rope.dimension_count={rope_dims}, head_dim {head_dim}) "
                              "is not supported")
    return {"model_type": "llama", "hidden_size": hidden, "num_attention_heads": n_heads, "head_dim": head_dim,
            "vocab_size": len(fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in fields
            else gguf_field(fields, "llama.vocab_size", path),
            "num_hidden_layers": gguf_field(fields, "llama.block_count", path),
            "intermediate_size": gguf_field(fields, "llama.feed_forward_length", path),
            "num_key_value_heads": gguf_field(fields, "llama.attention.head_count_kv", path, n_heads),
            "rope_theta": float(gguf_field(fields, "llama.rope.freq_base", path, 10000.0)),
            "rms_norm_eps": float(gguf_field(fields, "llama.attention.layer_norm_rms_epsilon", path)),
            "max_position_embeddings": gguf_field(fields, "llama.context_length", path, 2048),
            "bos_token_id": gguf_field(fields, "tokenizer.ggml.bos_token_id", path, 1),
            "eos_token_id": gguf_field(fields, "tokenizer.ggml.eos_token_id", path, 2)}


def read_gguf(path: str | Path) -> tuple[StateDict, dict[str, Any]]:
    """Dequantise every tensor of a llama GGUF; config from its metadata, tied when output.weight is absent."""
    import gguf

    path = Path(path)
    reader = open_gguf(path)
    config = _gguf_config(reader.fields, path)
    state: StateDict = {}
    for tensor in reader.tensors:
        # GGUF lists dimensions fastest first; numpy order is the reverse.
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        state[_gguf_hf_name(tensor.name, path)] = np.asarray(weights, np.float32).reshape(shape)
    config["tie_word_embeddings"] = "lm_head.weight" not in state
    for i in range(config["num_hidden_layers"]):
        for proj, heads in (("q_proj", config["num_attention_heads"]), ("k_proj", config["num_key_value_heads"])):
            key = f"model.layers.{i}.self_attn.{proj}.weight"
            if key in state:  # a missing one is reported by hf_to_params
                state[key] = interleaved_to_rotate_half(state[key], heads)
    return state, config


# ----------------------------------------------------------------------------------------------------
# The one mapping between HF names and the Flax parameter tree


@dataclasses.dataclass(frozen=True)
class _TensorSpec:
    hf_name: str
    tree_path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    kernel_shape: tuple[int, ...]
    # torch Linear weight [out, in] <-> Flax kernel: kernel = W.T reshaped (heads split out); any other
    # tensor is only reshaped (q/k/v biases [h * d] <-> [h, d]).
    linear: bool


def _tensor_specs(cfg: LlamaConfig) -> list[_TensorSpec]:
    x, m, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    h, k, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    specs = [_TensorSpec("model.embed_tokens.weight", ("embed_tokens", "embedding"), (v, x), (v, x), False)]
    for i in range(cfg.num_hidden_layers):
        hf, tree = f"model.layers.{i}.", f"layers_{i}"
        specs += [
            _TensorSpec(hf + "input_layernorm.weight", (tree, "input_norm", "scale"), (x,), (x,), False),
            _TensorSpec(hf + "self_attn.q_proj.weight", (tree, "attn", "q_proj", "kernel"), (h * d, x), (x, h, d), True),
            _TensorSpec(hf + "self_attn.k_proj.weight", (tree, "attn", "k_proj", "kernel"), (k * d, x), (x, k, d), True),
            _TensorSpec(hf + "self_attn.v_proj.weight", (tree, "attn", "v_proj", "kernel"), (k * d, x), (x, k, d), True),
            _TensorSpec(hf + "self_attn.o_proj.weight", (tree, "attn", "o_proj", "kernel"), (x, h * d), (h, d, x), True),
            _TensorSpec(hf + "post_attention_layernorm.weight", (tree, "post_attn_norm", "scale"), (x,), (x,), False),
            _TensorSpec(hf + "mlp.gate_proj.weight", (tree, "mlp", "gate_proj", "kernel"), (m, x), (x, m), True),
            _TensorSpec(hf + "mlp.up_proj.weight", (tree, "mlp", "up_proj", "kernel"), (m, x), (x, m), True),
            _TensorSpec(hf + "mlp.down_proj.weight", (tree, "mlp", "down_proj", "kernel"), (x, m), (m, x), True),
        ]
        specs += _attention_extras(cfg, hf + "self_attn.", (tree, "attn"))
    specs.append(_TensorSpec("model.norm.weight", ("norm", "scale"), (x,), (x,), False))
    if not cfg.tie_word_embeddings:
        specs.append(_TensorSpec("lm_head.weight", ("lm_head", "kernel"), (v, x), (x, v), True))
    return specs


def _attention_extras(cfg: LlamaConfig, hf: str, tree: tuple[str, ...]) -> list[_TensorSpec]:
    """Projection biases (Qwen2; LLaMA/Qwen3 with attention_bias) and Qwen3's per-head q/k norms."""
    h, k, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    specs = []
    if cfg.attention_bias:
        specs += [_TensorSpec(f"{hf}{proj}.bias", (*tree, proj, "bias"), (n * d,), (n, d), False)
                  for proj, n in (("q_proj", h), ("k_proj", k), ("v_proj", k))]
    if cfg.attention_out_bias:
        specs.append(_TensorSpec(hf + "o_proj.bias", (*tree, "o_proj", "bias"), (cfg.hidden_size,),
                                 (cfg.hidden_size,), False))
    if cfg.qk_norm:
        specs += [_TensorSpec(f"{hf}{norm}.weight", (*tree, norm, "scale"), (d,), (d,), False)
                  for norm in ("q_norm", "k_norm")]
    return specs


def _ignorable(name: str, state: StateDict, cfg: LlamaConfig) -> bool:
    """Tensors that carry no information beyond the mapped ones (derived buffers, a tied duplicate)."""
    if name.endswith("rotary_emb.inv_freq"):
        return True
    return (name == "lm_head.weight" and cfg.tie_word_embeddings
            and np.array_equal(state[name], state.get("model.embed_tokens.weight")))


def hf_to_params(state: StateDict, cfg: LlamaConfig, source: str = "checkpoint") -> Params:
    """HF-named state dict -> unscanned Flax params (numpy float32). Missing, misshapen or unknown
    tensors are errors; derived buffers are skipped and counted."""
    params: Params = {}
    specs = _tensor_specs(cfg)
    for spec in specs:
        if spec.hf_name not in state:
            raise CheckpointError(f"{source}: missing tensor {spec.hf_name}")
        w = state[spec.hf_name]
        if w.shape != spec.hf_shape:
            raise CheckpointError(f"{source}: tensor {spec.hf_name} has shape {w.shape}, the config implies "
                                  f"{spec.hf_shape}")
        value = np.ascontiguousarray(w.T.reshape(spec.kernel_shape)) if spec.linear else w.reshape(spec.kernel_shape)
        node = params
        for key in spec.tree_path[:-1]:
            node = node.setdefault(key, {})
        node[spec.tree_path[-1]] = value.astype(np.float32)
    leftover = set(state) - {spec.hf_name for spec in specs}
    unknown = sorted(n for n in leftover if not _ignorable(n, state, cfg))
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} tensors the LLaMA config does not use "
                              f"(e.g. {unknown[:5]}; an untied lm_head in a tied config?)")
    if leftover:
        logger.info("%s: skipped %d derived/duplicate tensors (%s)", source, len(leftover), sorted(leftover)[:3])
    return params


def params_to_hf(params: Params, cfg: LlamaConfig) -> StateDict:
    """Flax params (scanned or not, numpy or jax) -> HF-named float32 state dict (inverse of hf_to_params)."""
    if "layers" in params:
        params = unstack_layers(params)
    state: StateDict = {}
    for spec in _tensor_specs(cfg):
        value = params
        for key in spec.tree_path:
            value = value[key]
        value = np.asarray(value, dtype=np.float32)
        if value.shape != spec.kernel_shape:
            raise ValueError(f"param {'/'.join(spec.tree_path)} has shape {value.shape}, config implies "
                             f"{spec.kernel_shape}")
        state[spec.hf_name] = np.ascontiguousarray(
            value.reshape(spec.hf_shape[::-1]).T if spec.linear else value.reshape(spec.hf_shape))
    return state


# ----------------------------------------------------------------------------------------------------
# Writers


def save_hf(params: Params, cfg: LlamaConfig, out_dir: str | Path) -> Path:
    """config.json + generation_config.json + model.safetensors loadable by the family's transformers class
    (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM: `cfg.model_type`)."""
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(params_to_hf(params, cfg), out_dir / HF_WEIGHTS, metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out_dir


def save_orbax(params: Params, cfg: LlamaConfig, out_dir: str | Path) -> Path:
    """The project's format: unscanned params in `params/` (orbax) and the HF config.json beside them."""
    import orbax.checkpoint as ocp

    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(out_dir / ORBAX_PARAMS, unstack_layers(params), force=True)
    checkpointer.wait_until_finished()
    (out_dir / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
    return out_dir


def _read_orbax(folder: Path) -> tuple[Params, dict[str, Any]]:
    import orbax.checkpoint as ocp

    config = _read_json(folder / "config.json")
    try:
        params = ocp.StandardCheckpointer().restore(folder.absolute() / ORBAX_PARAMS)
    except (ValueError, OSError, KeyError) as e:
        raise CheckpointError(f"{folder / ORBAX_PARAMS}: unreadable orbax checkpoint, truncated or corrupt "
                              f"({type(e).__name__}: {e})") from e
    return jax.tree.map(lambda a: np.asarray(a, np.float32), params), config


def _check_orbax_params(params: Params, cfg: LlamaConfig, folder: Path) -> None:
    """Every parameter the config implies is present with its shape, and nothing else is there."""
    from flax.traverse_util import flatten_dict

    have = {"/".join(k): np.shape(v) for k, v in flatten_dict(params).items()}
    want = {"/".join(spec.tree_path): spec.kernel_shape for spec in _tensor_specs(cfg)}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    wrong = [f"{k} {have[k]} (config.json implies {want[k]})" for k in sorted(want) if k in have and have[k] != want[k]]
    problems = ([f"missing {missing[:3]}"] if missing else []) + ([f"unexpected {extra[:3]}"] if extra else []) + \
        ([f"shapes {wrong[:3]}"] if wrong else [])
    if problems:
        raise CheckpointError(f"{folder / ORBAX_PARAMS}: parameters do not match {folder / 'config.json'}: "
                              + "; ".join(problems))


# ----------------------------------------------------------------------------------------------------
# Loading


_READERS: dict[str, Callable[[Path], tuple[StateDict, dict[str, Any]]]] = {
    "hf": read_hf_folder, "llama2c": read_llama2c, "gguf": read_gguf}


# config.json fields that describe no part of the computation (bookkeeping, generation defaults, output
# flags, label maps): accepted and not used. Any field outside these, the ones LlamaConfig reads and the
# architecture fields it checks is refused: an ignored field could silently mean another model.
_HF_METADATA = frozenset({
    "_name_or_path", "architectures", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "initializer_range", "pad_token_id", "sep_token_id", "decoder_start_token_id", "tokenizer_class",
    "is_llama_config", "transformers.js_config", "return_dict", "output_attentions", "output_hidden_states",
    "torchscript", "use_bfloat16", "tf_legacy_loss", "id2label", "label2id", "problem_type", "finetuning_task",
    "task_specific_params", "prefix", "chunk_size_feed_forward", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p",
    "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens"})
# Fields that would change the model, accepted only at the value this port implements.
_HF_NEUTRAL = {"partial_rotary_factor": 1.0, "attention_dropout": 0.0, "rope_interleaved": False,
               "is_encoder_decoder": False, "add_cross_attention": False, "tie_encoder_decoder": False,
               "is_decoder": False, "pruned_heads": {}, "cross_attention_hidden_size": None}
_HF_COUNTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings")


def check_hf_config(hf: dict[str, Any], source: Path | str) -> dict[str, Any]:
    """`hf` checked field by field (CheckpointError naming `source` and the field): counts are positive
    integers that divide as attention needs; neutral-valued fields hold their neutral value; no field is
    unknown. Returns it with `rope_scaling: {"rope_type": "default"}` (HF's spelling of none) as None."""
    from notellm_jax.model import llama

    known = set(llama._HF_FIELDS) | set(llama._HF_REQUIRED) | set(llama._HF_INTERPRETED) | set(_HF_NEUTRAL) | \
        _HF_METADATA
    unknown = sorted(k for k in hf if k not in known)
    if unknown:
        raise CheckpointError(f"{source}: unsupported config field(s) {unknown} (not implemented by this LLaMA "
                              "port, so they cannot be honoured; remove them only if they do not change the model)")
    for key, neutral in _HF_NEUTRAL.items():
        if key in hf and hf[key] != neutral and not (neutral in ({}, None) and not hf[key]):
            raise CheckpointError(f"{source}: unsupported config field {key}={hf[key]!r} (this LLaMA port "
                                  f"implements {key}={neutral!r})")
    for key in _HF_COUNTS:
        value = hf.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise CheckpointError(f"{source}: config field {key}={value!r} must be a positive integer")
    heads, kv_heads = hf.get("num_attention_heads"), hf.get("num_key_value_heads")
    if heads and kv_heads and heads % kv_heads:
        raise CheckpointError(f"{source}: config field num_key_value_heads={kv_heads} does not divide "
                              f"num_attention_heads={heads}")
    scaling = hf.get("rope_scaling")
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == "default":
        hf = {**hf, "rope_scaling": None}  # HF's "default" rope type is unscaled RoPE
    return hf


def _config_from_hf(hf_config: dict[str, Any], source: Path, runtime: dict[str, Any]) -> LlamaConfig:
    hf_config = check_hf_config(hf_config, source)
    try:
        return LlamaConfig.from_hf_dict(hf_config, **runtime)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: {e}") from e


def load_params(path: str | Path, **runtime: Any) -> tuple[Params, LlamaConfig]:
    """(params, LlamaConfig) from any supported checkpoint. `runtime` sets LlamaConfig's runtime fields
    (compute_dtype, param_dtype, scan_layers, remat_policy); with scan_layers the layers come stacked."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "orbax":
        params, hf_config = _read_orbax(path)
        cfg = _config_from_hf(hf_config, path, runtime)
        _check_orbax_params(params, cfg, path)
    else:
        state, hf_config = _READERS[fmt](path)
        cfg = _config_from_hf(hf_config, path, runtime)
        params = hf_to_params(state, cfg, source=str(path))
    if cfg.param_dtype != "float32":
        params = jax.tree.map(lambda a: a.astype(jnp.dtype(cfg.param_dtype)), params)
    return (stack_layers(params) if cfg.scan_layers else params), cfg


def load_causal_lm(path: str | Path, **runtime: Any) -> CausalLM:
    """Load an HF folder, llama2.c .bin, .gguf or orbax folder (format detected) as a CausalLM."""
    params, cfg = load_params(path, **runtime)
    return CausalLM(params, cfg)
