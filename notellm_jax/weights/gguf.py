"""GGUF files (e.g. SmolLM2-135M-Instruct.Q4_1): the reader, where a damaged file is cut, the metadata and
the HF-style config read from it, and the tensors dequantised per slice.

llama.cpp stores Q/K in Meta's interleaved RoPE layout; they are seen in HF's rotate-half layout. The
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
from notellm_jax.weights.lazy import Index, LazyState, LazyTensor, index_ranges, rope_to_rotate_half


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
_GGUF_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.weight$")


def gguf_hf_name(name: str, path: Path) -> str:
    """The HF name of a GGUF tensor (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`);
    a tensor outside the LLaMA architecture is a CheckpointError."""
    match = _GGUF_LAYER.match(name)
    if match and match.group(2) in _GGUF_LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_GGUF_LAYER_NAMES[match.group(2)]}.weight"
    if name in _GGUF_NAMES:
        return _GGUF_NAMES[name]
    raise CheckpointError(f"{path}: GGUF tensor {name!r} is not part of the supported LLaMA architecture")


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
    """The HF-style config of a llama GGUF from its metadata `fields` (architecture, shapes, RoPE, special
    tokens); unsupported architectures or RoPE variants are CheckpointErrors. Ties are left to the caller."""
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


def open_gguf_state(path: str | Path) -> tuple[LazyState, dict[str, Any]]:
    """Every tensor of a llama GGUF, dequantised per slice from the memory map; config from its metadata,
    tied when output.weight is absent."""
    path = Path(path)
    reader = open_gguf(path)
    config = gguf_config(reader.fields, path)
    state: LazyState = {}
    for tensor in reader.tensors:
        # GGUF lists dimensions fastest first; numpy order is the reverse.
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        state[gguf_hf_name(tensor.name, path)] = GGUFTensor(tensor, shape)
    config["tie_word_embeddings"] = "lm_head.weight" not in state
    rope_to_rotate_half(state, config["num_hidden_layers"], config["num_attention_heads"],
                         config["num_key_value_heads"])
    return state, config
