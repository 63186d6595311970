"""GGUF files (llama, gemma2, gemma3; e.g. SmolLM2-135M-Instruct.Q4_1): the reader, where a damaged file is
cut, the metadata and the HF-style config read from it, and the tensors dequantised per slice.

llama.cpp stores LLaMA's Q/K in Meta's interleaved RoPE layout; they are seen in HF's rotate-half layout.
Gemma's Q/K are stored in rotate-half already, its RMSNorm weights as 1 + scale (read back as scale). The
`gguf` package is imported only where a GGUF is read: hosts that train from packed weights
(`weights.packed`) do not have it.
"""
from __future__ import annotations

import functools
import mmap
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from notellm_jax.errors import CheckpointError, MissingInputError
from notellm_jax.weights.lazy import ArrayTensor, Index, LazyState, LazyTensor, index_ranges, rope_to_rotate_half


class GGUFTensor(LazyTensor):
    """A (possibly quantised) GGUF tensor on the reader's memory map: only the rows a slice needs are
    dequantised (quantisation blocks run along a row, so rows are independent)."""

    def __init__(self, tensor, shape: tuple[int, ...]):
        self.tensor, self.shape = tensor, shape

    def read(self, index: Index) -> np.ndarray:
        import gguf  # the gguf package: absent where only packed weights are read
        if len(self.shape) == 1:
            return np.asarray(gguf.quants.dequantize(self.tensor.data, self.tensor.tensor_type), np.float32)[index]
        rows = index_ranges(index, self.shape)[0]
        data = self.tensor.data[rows.start:rows.stop]
        values = np.asarray(gguf.quants.dequantize(data, self.tensor.tensor_type), np.float32)
        values = values.reshape((rows.stop - rows.start,) + self.shape[1:])
        return values[(slice(None, None, rows.step),) + tuple(index)[1:]]


_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
# Gemma's four norms a block and q/k norms (llama.cpp's ffn_norm is the pre-feed-forward norm there).
_GGUF_GEMMA_LAYER_NAMES = {
    **_GGUF_LAYER_NAMES, "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}
_GGUF_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.weight$")
GGUF_ARCHITECTURES = ("llama", "gemma2", "gemma3")


def gguf_hf_name(name: str, path: Path, arch: str = "llama") -> str:
    """The HF name of a GGUF tensor (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`);
    a tensor outside the file's architecture is a CheckpointError."""
    layer_names = _GGUF_LAYER_NAMES if arch == "llama" else _GGUF_GEMMA_LAYER_NAMES
    match = _GGUF_LAYER.match(name)
    if match and match.group(2) in layer_names:
        return f"model.layers.{match.group(1)}.{layer_names[match.group(2)]}.weight"
    if name in _GGUF_NAMES:
        return _GGUF_NAMES[name]
    raise CheckpointError(f"{path}: GGUF tensor {name!r} is not part of the supported {arch} architecture")


@functools.lru_cache(maxsize=2)
def _cached_gguf_reader(path: str, mtime_ns: int):
    import gguf  # the gguf package: absent where only packed weights are read
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
    import gguf  # the gguf package: absent where only packed weights are read

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


def gguf_config(fields: dict, path: Path) -> dict[str, Any]:
    """The HF-style config of a llama, gemma2 or gemma3 GGUF from its metadata `fields` (architecture, shapes,
    RoPE, special tokens); unsupported architectures or RoPE variants are CheckpointErrors. Ties are left to
    the caller."""
    arch = gguf_field(fields, "general.architecture", path)
    if arch not in GGUF_ARCHITECTURES:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported ({', '.join(GGUF_ARCHITECTURES)})")
    field = lambda key, *default: gguf_field(fields, f"{arch}.{key}", path, *default)  # noqa: E731
    scaling = field("rope.scaling.type", "none")
    if scaling != "none" and (arch, scaling) != ("gemma3", "linear"):
        raise CheckpointError(f"{path}: unsupported GGUF field {arch}.rope.scaling.type={scaling!r}")
    n_heads, hidden = field("attention.head_count"), field("embedding_length")
    if not isinstance(n_heads, int | np.integer) or n_heads <= 0:
        raise CheckpointError(f"{path}: GGUF field {arch}.attention.head_count={n_heads!r} must be a positive integer")
    head_dim = field("attention.key_length", hidden // n_heads)
    rope_dims = field("rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise CheckpointError(f"{path}: partial RoPE ({arch}.rope.dimension_count={rope_dims}, head_dim {head_dim}) "
                              "is not supported")
    config = {"model_type": "llama", "hidden_size": hidden, "num_attention_heads": n_heads, "head_dim": head_dim,
              "vocab_size": len(fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in fields
              else field("vocab_size"),
              "num_hidden_layers": field("block_count"), "intermediate_size": field("feed_forward_length"),
              "num_key_value_heads": field("attention.head_count_kv", n_heads),
              "rope_theta": float(field("rope.freq_base", 10000.0)),
              "rms_norm_eps": float(field("attention.layer_norm_rms_epsilon")),
              "max_position_embeddings": field("context_length", 2048),
              "bos_token_id": gguf_field(fields, "tokenizer.ggml.bos_token_id", path, 1),
              "eos_token_id": gguf_field(fields, "tokenizer.ggml.eos_token_id", path, 2)}
    if arch != "llama":
        config.update(_gemma_gguf_config(field, arch, config, scaling))
    return config


def _gemma_gguf_config(field, arch: str, config: dict[str, Any], scaling: str) -> dict[str, Any]:
    """What llama.cpp fixes for Gemma beyond the llama fields: the layer pattern (every 2nd layer full in
    Gemma 2, every 6th in Gemma 3, unless the file lists it), the attention scale (1/sqrt(head_dim), but
    1/sqrt(hidden / heads) for the 27B models: 46 layers in Gemma 2, 62 in Gemma 3), Gemma 3's local RoPE base
    (10,000) and the soft-caps (absent keys: HF's defaults, as llama.cpp's)."""
    n, heads = config["num_hidden_layers"], config["num_attention_heads"]
    pattern = field("attention.sliding_window_pattern", 2 if arch == "gemma2" else 6)
    sliding = [bool(x) for x in pattern] if isinstance(pattern, list) else [(i + 1) % pattern != 0 for i in range(n)]
    big = (arch, n) in (("gemma2", 46), ("gemma3", 62))
    out = {"model_type": "gemma2" if arch == "gemma2" else "gemma3_text", "sliding_window":
           field("attention.sliding_window"), "layer_types": ["sliding_attention" if s else "full_attention"
                                                              for s in sliding],
           "query_pre_attn_scalar": config["hidden_size"] // heads if big else config["head_dim"]}
    for key in ("final_logit_softcapping",) + (("attn_logit_softcapping",) if arch == "gemma2" else ()):
        value = field(key, None)
        if value is not None:
            out[key] = float(value)
    if arch == "gemma3":
        out["rope_local_base_freq"] = 10000.0
    if scaling == "linear":
        out["rope_scaling"] = {"rope_type": "linear", "factor": float(field("rope.scaling.factor"))}
    return out


def open_gguf_state(path: str | Path) -> tuple[LazyState, dict[str, Any]]:
    """Every tensor of a llama GGUF, dequantised per slice from the memory map; config from its metadata,
    tied when output.weight is absent."""
    path = Path(path)
    reader = open_gguf(path)
    config = gguf_config(reader.fields, path)
    arch = gguf_field(reader.fields, "general.architecture", path)
    state: LazyState = {}
    for tensor in reader.tensors:
        # GGUF lists dimensions fastest first; numpy order is the reverse.
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        name = gguf_hf_name(tensor.name, path, arch)
        state[name] = GGUFTensor(tensor, shape)
        if arch != "llama" and name.endswith("norm.weight"):  # llama.cpp stores Gemma's norms as 1 + scale
            state[name] = ArrayTensor(state[name].full() - 1.0)
    config["tie_word_embeddings"] = "lm_head.weight" not in state
    if arch == "llama":  # Gemma's Q/K are already in the rotate-half (NeoX) layout
        rope_to_rotate_half(state, config["num_hidden_layers"], config["num_attention_heads"],
                            config["num_key_value_heads"])
    return state, config
