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

Readers are lazy (`LazyTensor`: a shape and `read(index)` of any slice), so `place_params` builds each
global array from only the slices a process's devices hold, with the HF -> Flax transpose, the [EMB]
rows, the vocabulary padding and the scan stacking done per slice on the host: no host or device ever
holds the whole model on the way to being sharded.

Public API: `load_causal_lm(path) -> CausalLM` (logits, greedy generate with the KV cache),
`open_params(path) -> (lazy params, LlamaConfig)`, `place_params`, `load_params(path) -> (params,
LlamaConfig)`, `save_hf`, `save_orbax`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from notellm_jax.model.decode import CausalLM
from notellm_jax.model.families import LlamaConfig, config_from_hf
from notellm_jax.model.params import emb_growth, grow_table, sharded_abstract_params, stack_layers, unstack_layers
from notellm_jax.errors import CheckpointError, MissingInputError

logger = logging.getLogger(__name__)

StateDict = dict[str, np.ndarray]
LazyState = dict[str, "LazyTensor"]
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


# ----------------------------------------------------------------------------------------------------
# Lazy tensors: a shape plus `read(index)` of any rectangular slice. Readers return these instead of
# arrays, so a process reads from disk only the slices its devices hold (`place_params`), and every
# layout change (transpose, [EMB] rows, vocabulary padding, layer stacking) happens per slice on the host.

Index = tuple[slice, ...]


def _ranges(index: Index, shape: tuple[int, ...]) -> list[range]:
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return [range(*s.indices(n)) for s, n in zip(index, shape)]


def _full_index(shape: tuple[int, ...]) -> Index:
    return tuple(slice(None) for _ in shape)


class LazyTensor:
    shape: tuple[int, ...]

    def read(self, index: Index) -> np.ndarray:
        raise NotImplementedError

    def full(self) -> np.ndarray:
        return self.read(_full_index(self.shape))


class ArrayTensor(LazyTensor):
    """An in-memory or memory-mapped array (np.memmap pages are read only where sliced)."""

    def __init__(self, array: np.ndarray):
        self.array, self.shape = array, tuple(array.shape)

    def read(self, index: Index) -> np.ndarray:
        return np.array(self.array[tuple(index)])


class SafetensorsTensor(LazyTensor):
    """One tensor of a safetensors file, read with positional reads of row blocks (at most `BLOCK_BYTES`
    of file data at a time), not through a memory map: a column slice (a shard of a table split over its
    second axis) touches every page of the tensor, and mapped pages count in the process's RSS while the
    map is open, so a mapped read of one shard cost the whole tensor in RSS high-water."""

    BLOCK_BYTES = 8 << 20

    def __init__(self, path: Path, name: str, shape: tuple[int, ...], dtype: np.dtype, offset: int):
        self.path, self.name, self.shape, self.dtype, self.offset = path, name, shape, dtype, offset

    def read(self, index: Index) -> np.ndarray:
        with open(self.path, "rb") as f:
            if not self.shape:
                return np.frombuffer(_pread(f, self.offset, self.dtype.itemsize), self.dtype).reshape(())
            ranges = _ranges(index, self.shape)
            rows, rest = ranges[0], tuple(slice(r.start, r.stop, r.step) for r in ranges[1:])
            if rows.step < 0:
                raise ValueError(f"{self.name}: reversed row slice {rows}")
            row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
            per_block = max(1, self.BLOCK_BYTES // max(1, row_bytes)) * rows.step
            out = np.empty([len(r) for r in ranges], self.dtype)
            done = 0
            for lo in range(rows.start, rows.stop, per_block):
                hi = min(lo + per_block, rows.stop)
                data = _pread(f, self.offset + lo * row_bytes, (hi - lo) * row_bytes)
                block = np.frombuffer(data, self.dtype).reshape((hi - lo,) + self.shape[1:])
                block = block[(slice(None, None, rows.step),) + rest]
                out[done:done + len(block)] = block
                done += len(block)
        return out


def _pread(f, offset: int, size: int) -> bytes:
    data = os.pread(f.fileno(), size, offset)
    if len(data) != size:
        raise CheckpointError(f"{f.name}: truncated, wanted {size} bytes at offset {offset}, got {len(data)}")
    return data


class GGUFTensor(LazyTensor):
    """A (possibly quantised) GGUF tensor on the reader's memory map: only the rows a slice needs are
    dequantised (quantisation blocks run along a row, so rows are independent)."""

    def __init__(self, tensor, shape: tuple[int, ...]):
        self.tensor, self.shape = tensor, shape

    def read(self, index: Index) -> np.ndarray:
        import gguf
        if len(self.shape) == 1:
            return np.asarray(gguf.quants.dequantize(self.tensor.data, self.tensor.tensor_type), np.float32)[index]
        rows = _ranges(index, self.shape)[0]
        data = self.tensor.data[rows.start:rows.stop]
        values = np.asarray(gguf.quants.dequantize(data, self.tensor.tensor_type), np.float32)
        values = values.reshape((rows.stop - rows.start,) + self.shape[1:])
        return values[(slice(None, None, rows.step),) + tuple(index)[1:]]


def _gather(base: LazyTensor, axis: int, positions: np.ndarray, index: Index) -> np.ndarray:
    """base[positions] along `axis` (the other axes sliced by `index`): one read of the covering range."""
    lo, hi = int(positions.min()), int(positions.max()) + 1
    sub = list(tuple(index) + (slice(None),) * (len(base.shape) - len(index)))
    sub[axis] = slice(lo, hi)
    block = base.read(tuple(sub))
    if hi - lo == len(positions) and np.all(np.diff(positions) == 1):
        return block
    return np.take(block, positions - lo, axis=axis)


class RowPermuted(LazyTensor):
    """Row r of this tensor is row perm[r] of `base` (the RoPE layout fix of llama2.c and GGUF Q/K)."""

    def __init__(self, base: LazyTensor, perm: np.ndarray):
        self.base, self.perm, self.shape = base, perm, base.shape

    def read(self, index: Index) -> np.ndarray:
        rows = _ranges(index, self.shape)[0]
        return _gather(self.base, 0, self.perm[rows.start:rows.stop:rows.step], (slice(None),) + tuple(index)[1:])


class Kernel(LazyTensor):
    """A torch Linear weight [out, in] seen as a Flax kernel: W.T reshaped to `shape`, whose first
    `contract` axes split `in` and the others split `out` (heads out of q/k/v, heads into o_proj)."""

    def __init__(self, base: LazyTensor, shape: tuple[int, ...], contract: int):
        self.base, self.shape, self.contract = base, shape, contract

    def read(self, index: Index) -> np.ndarray:
        ranges = _ranges(index, self.shape)
        flat = []
        for axes in (slice(0, self.contract), slice(self.contract, None)):
            grid = np.meshgrid(*[np.asarray(r) for r in ranges[axes]], indexing="ij")
            flat.append(np.ravel_multi_index(grid, self.shape[axes]).reshape(-1))
        flat_in, flat_out = flat
        lo, hi = int(flat_in.min()), int(flat_in.max()) + 1
        block = _gather(self.base, 0, flat_out, (slice(None), slice(lo, hi))).T  # [in range, out']
        if hi - lo != len(flat_in) or np.any(np.diff(flat_in) != 1):
            block = block[flat_in - lo]
        return np.ascontiguousarray(block).reshape([len(r) for r in ranges])


class VocabGrown(LazyTensor):
    """A vocabulary table grown by `n_new` entries equal to the mean of the existing ones ([EMB], see
    `add_tokens`), or with its existing row `reset` set to the mean of the rows before it
    (`init_unused_token`), and zero-padded to `size` entries (`padded_vocab_size`); `axis` is the
    vocabulary axis. The arithmetic of `model.params.grow_vocab`, per slice."""

    def __init__(self, base: LazyTensor, axis: int, n_new: int, size: int, reset: int | None = None):
        self.base, self.axis, self.n_new, self.real = base, axis, n_new, base.shape[axis]
        self.reset, self.used = reset, self.real if reset is None else reset
        self.shape = tuple(size if a == axis else n for a, n in enumerate(base.shape))
        self._mean: np.ndarray | None = None

    def mean(self) -> np.ndarray:
        """Mean of the used entries over the vocabulary axis (float64 sums), read 4096 entries at a time."""
        if self._mean is None:
            total = 0.0
            for start in range(0, self.used, 4096):
                index = list(_full_index(self.base.shape))
                index[self.axis] = slice(start, min(start + 4096, self.used))
                total = total + self.base.read(tuple(index)).sum(axis=self.axis, keepdims=True, dtype=np.float64)
            self._mean = total / self.used
        return self._mean

    def read(self, index: Index) -> np.ndarray:
        ranges = _ranges(index, self.shape)
        vocab = ranges[self.axis]
        if vocab.step != 1:
            raise ValueError(f"strided vocabulary slice {vocab}")
        others = [slice(r.start, r.stop, r.step) for r in ranges]
        others[self.axis] = slice(min(vocab.start, self.real), min(vocab.stop, self.real))
        if vocab.start < self.real:
            real = self.base.read(tuple(others))
        else:  # a shard of only [EMB] rows and padding (e.g. the vocabulary split over `tensor`)
            real = np.zeros([0 if a == self.axis else len(r) for a, r in enumerate(ranges)], np.float32)
        grown_end = self.real + self.n_new
        n_new = max(0, min(vocab.stop, grown_end) - max(vocab.start, self.real))
        n_pad = max(0, vocab.stop - max(vocab.start, grown_end))
        others[self.axis] = slice(None)
        resets = self.reset is not None and vocab.start <= self.reset < vocab.stop
        mean = self.mean()[tuple(others)] if n_new or resets else None
        if resets:
            real = np.array(real)
            row = [slice(None)] * real.ndim
            row[self.axis] = slice(self.reset - vocab.start, self.reset - vocab.start + 1)
            real[tuple(row)] = mean
        if not (n_new or n_pad):
            return real
        if mean is None:  # nothing to repeat, but the same rank for grow_table
            mean = np.zeros(real.shape[:self.axis] + (1,) + real.shape[self.axis + 1:], real.dtype)
        return grow_table(real, mean, n_new, n_pad, self.axis)


class Transposed(LazyTensor):
    """A 2-d tensor seen transposed (an untied head initialised from the embedding table: `untie_head`)."""

    def __init__(self, base: LazyTensor):
        if len(base.shape) != 2:
            raise ValueError(f"Transposed needs a 2-d tensor, got shape {base.shape}")
        self.base, self.shape = base, base.shape[::-1]

    def read(self, index: Index) -> np.ndarray:
        rows, cols = (slice(r.start, r.stop, r.step) for r in _ranges(index, self.shape))
        return np.ascontiguousarray(self.base.read((cols, rows)).T)


class Stacked(LazyTensor):
    """Per-layer tensors stacked along a new leading axis (the scan layout)."""

    def __init__(self, layers: tuple[LazyTensor, ...]):
        self.layers = tuple(layers)
        self.shape = (len(self.layers),) + self.layers[0].shape

    def read(self, index: Index) -> np.ndarray:
        ranges = _ranges(index, self.shape)
        rest = tuple(slice(r.start, r.stop, r.step) for r in ranges[1:])
        return np.stack([self.layers[i].read(rest) for i in ranges[0]])


def _open_safetensors(path: Path) -> dict[str, LazyTensor]:
    """Names, shapes, dtypes and data offsets from the header; no tensor data is read until a slice is."""
    import ml_dtypes
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise MissingInputError(f"missing safetensors file {path}")
    dtypes = {"BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype("<f2"), "F32": np.dtype("<f4"),
              "F64": np.dtype("<f8")}
    try:  # safetensors validates the file (header, offsets, size); the offsets come from the header
        with safe_open(path, framework="np") as f:
            names = list(f.keys())
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_size))
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file, truncated or corrupt ({e})") from e
    tensors: dict[str, LazyTensor] = {}
    for name in names:
        entry = header[name]
        if entry["dtype"] not in dtypes:
            raise CheckpointError(f"{path}: tensor {name} has dtype {entry['dtype']}, expected a float type")
        tensors[name] = SafetensorsTensor(path, name, tuple(entry["shape"]), dtypes[entry["dtype"]],
                                          8 + header_size + int(entry["data_offsets"][0]))
    return tensors


def open_hf_folder(folder: str | Path) -> tuple[dict[str, LazyTensor], dict[str, Any]]:
    """config.json + model.safetensors, or the shards named by model.safetensors.index.json (lazily)."""
    folder = Path(folder)
    config = _read_json(folder / "config.json")
    if not (folder / HF_INDEX).is_file():
        return _open_safetensors(folder / HF_WEIGHTS), config
    weight_map = _read_json(folder / HF_INDEX).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{folder / HF_INDEX}: no weight_map")
    state: dict[str, LazyTensor] = {}
    for shard in sorted(set(weight_map.values())):
        tensors = _open_safetensors(folder / shard)
        misplaced = sorted(n for n, f in weight_map.items() if f == shard and n not in tensors)
        if misplaced:
            raise CheckpointError(f"{folder / shard}: lacks tensors the index assigns to it: {misplaced[:5]}")
        state.update(tensors)
    return state, config


def rotate_half_permutation(rows: int, n_heads: int) -> np.ndarray:
    """perm with rotate_half[r] = interleaved[perm[r]]: Meta's interleaved RoPE pairs (llama2.c, llama.cpp)
    to HF's rotate-half halves, as HF's convert_llama_weights_to_hf does."""
    return np.arange(rows).reshape(n_heads, rows // n_heads // 2, 2).swapaxes(1, 2).reshape(-1)


def interleaved_to_rotate_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Q/K rows of a whole array from the interleaved to the rotate-half layout (`RowPermuted` lazily)."""
    return w[rotate_half_permutation(w.shape[0], n_heads)]


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


def _rope_to_rotate_half(state: LazyState, n_layers: int, n_heads: int, n_kv_heads: int) -> None:
    for i in range(n_layers):
        for proj, heads in (("q_proj", n_heads), ("k_proj", n_kv_heads)):
            key = f"model.layers.{i}.self_attn.{proj}.weight"
            if key in state:  # a missing one is reported by hf_to_params
                state[key] = RowPermuted(state[key], rotate_half_permutation(state[key].shape[0], heads))


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
    _rope_to_rotate_half(state, n_layers, h["n_heads"], h["n_kv_heads"])
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


def open_gguf_state(path: str | Path) -> tuple[LazyState, dict[str, Any]]:
    """Every tensor of a llama GGUF, dequantised per slice from the memory map; config from its metadata,
    tied when output.weight is absent."""
    path = Path(path)
    reader = open_gguf(path)
    config = _gguf_config(reader.fields, path)
    state: LazyState = {}
    for tensor in reader.tensors:
        # GGUF lists dimensions fastest first; numpy order is the reverse.
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        state[_gguf_hf_name(tensor.name, path)] = GGUFTensor(tensor, shape)
    config["tie_word_embeddings"] = "lm_head.weight" not in state
    _rope_to_rotate_half(state, config["num_hidden_layers"], config["num_attention_heads"],
                         config["num_key_value_heads"])
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

    @property
    def contract(self) -> int:
        """How many leading kernel axes split the Linear's `in` features (1, or 2 for o_proj's heads)."""
        for n in range(1, len(self.kernel_shape)):
            if (math.prod(self.kernel_shape[:n]), math.prod(self.kernel_shape[n:])) == self.hf_shape[::-1]:
                return n
        raise ValueError(f"{self.hf_name}: kernel {self.kernel_shape} does not factor {self.hf_shape}")

    @property
    def vocab_axis(self) -> int | None:
        """The kernel axis indexed by token id (grown by [EMB], padded), if any."""
        return _VOCAB_AXIS.get(self.tree_path)


_VOCAB_AXIS = {("embed_tokens", "embedding"): 0, ("lm_head", "kernel"): 1}


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


def _ignorable(name: str, state: LazyState, cfg: LlamaConfig) -> bool:
    """Tensors that carry no information beyond the mapped ones (derived buffers, a tied duplicate)."""
    if name.endswith("rotary_emb.inv_freq"):
        return True
    return (name == "lm_head.weight" and cfg.tie_word_embeddings and "model.embed_tokens.weight" in state
            and np.array_equal(state[name].full(), state["model.embed_tokens.weight"].full()))


def _set(tree: Params, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def hf_to_params(state: LazyState | StateDict, cfg: LlamaConfig, source: str = "checkpoint", n_new: int = 0,
                 reset: int | None = None) -> Params:
    """HF-named state (LazyTensors or arrays) -> unscanned Flax params as LazyTensors (nothing is read yet).
    `cfg` describes the checkpoint; the token tables grow as `grow_vocab(n_new, reset)` makes them ([EMB])
    and are padded to `cfg.replace(vocab_size=cfg.vocab_size + n_new).padded_vocab_size` entries. Missing,
    misshapen or unknown tensors are errors; derived buffers are skipped and counted."""
    state = {k: v if isinstance(v, LazyTensor) else ArrayTensor(np.asarray(v)) for k, v in state.items()}
    params: Params = {}
    specs = _tensor_specs(cfg)
    padded = cfg.replace(vocab_size=cfg.vocab_size + n_new).padded_vocab_size
    for spec in specs:
        if spec.hf_name not in state:
            raise CheckpointError(f"{source}: missing tensor {spec.hf_name}")
        w = state[spec.hf_name]
        if w.shape != spec.hf_shape:
            raise CheckpointError(f"{source}: tensor {spec.hf_name} has shape {w.shape}, the config implies "
                                  f"{spec.hf_shape}")
        if spec.linear:
            value = Kernel(w, spec.kernel_shape, spec.contract)
        else:  # small (norms, biases: [h * d] -> [h, d]) or, for the embedding, already in its layout
            value = w if w.shape == spec.kernel_shape else ArrayTensor(w.full().reshape(spec.kernel_shape))
        if spec.vocab_axis is not None:
            value = VocabGrown(value, spec.vocab_axis, n_new, padded, reset)
        _set(params, spec.tree_path, value)
    leftover = set(state) - {spec.hf_name for spec in specs}
    unknown = sorted(n for n in leftover if not _ignorable(n, state, cfg))
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} tensors the LLaMA config does not use "
                              f"(e.g. {unknown[:5]}; an untied lm_head in a tied config?)")
    if leftover:
        logger.info("%s: skipped %d derived/duplicate tensors (%s)", source, len(leftover), sorted(leftover)[:3])
    return params


def params_to_hf(params: Params, cfg: LlamaConfig) -> StateDict:
    """Flax params (scanned or not, numpy or jax) -> HF-named float32 state dict (inverse of hf_to_params;
    the vocabulary padding is dropped)."""
    if "layers" in params:
        params = unstack_layers(params)
    state: StateDict = {}
    for spec in _tensor_specs(cfg):
        value = params
        for key in spec.tree_path:
            value = value[key]
        value = np.asarray(value, dtype=np.float32)
        if spec.vocab_axis is not None and value.shape[spec.vocab_axis] == cfg.padded_vocab_size:
            value = np.take(value, np.arange(cfg.vocab_size), axis=spec.vocab_axis)
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


def _open_orbax(folder: Path, cfg: LlamaConfig, n_new: int, reset: int | None) -> Params:
    """The project's own format, already in the Flax layout: restored to the host, then seen lazily (a
    padded table is cut back to the config's vocabulary before any growth and re-padding)."""
    import orbax.checkpoint as ocp

    try:
        params = ocp.StandardCheckpointer().restore(folder.absolute() / ORBAX_PARAMS)
    except (ValueError, OSError, KeyError) as e:
        raise CheckpointError(f"{folder / ORBAX_PARAMS}: unreadable orbax checkpoint, truncated or corrupt "
                              f"({type(e).__name__}: {e})") from e
    _check_orbax_params(params, cfg, folder)
    padded = cfg.replace(vocab_size=cfg.vocab_size + n_new).padded_vocab_size
    lazy: Params = {}
    for spec in _tensor_specs(cfg):
        value = params
        for key in spec.tree_path:
            value = value[key]
        value = np.asarray(value)
        tensor: LazyTensor = ArrayTensor(value)
        if spec.vocab_axis is not None:  # a padded table is cut back to the config's vocabulary first
            value = np.take(value, np.arange(cfg.vocab_size), axis=spec.vocab_axis)
            tensor = VocabGrown(ArrayTensor(value), spec.vocab_axis, n_new, padded, reset)
        _set(lazy, spec.tree_path, tensor)
    return lazy


def _check_orbax_params(params: Params, cfg: LlamaConfig, folder: Path) -> None:
    """Every parameter the config implies is present with its shape (a token table may carry vocabulary
    padding beyond the config's vocab_size), and nothing else is there."""
    from flax.traverse_util import flatten_dict

    have = {"/".join(k): tuple(np.shape(v)) for k, v in flatten_dict(params).items()}
    specs = {"/".join(spec.tree_path): spec for spec in _tensor_specs(cfg)}
    missing, extra = sorted(set(specs) - set(have)), sorted(set(have) - set(specs))
    wrong = [f"{k} {have[k]} (config.json implies {spec.kernel_shape})" for k, spec in sorted(specs.items())
             if k in have and not _fits(spec, have[k])]
    problems = ([f"missing {missing[:3]}"] if missing else []) + ([f"unexpected {extra[:3]}"] if extra else []) + \
        ([f"shapes {wrong[:3]}"] if wrong else [])
    if problems:
        raise CheckpointError(f"{folder / ORBAX_PARAMS}: parameters do not match {folder / 'config.json'}: "
                              + "; ".join(problems))


def _fits(spec: _TensorSpec, shape: tuple[int, ...]) -> bool:
    """`shape` is the spec's kernel shape, up to vocabulary padding along its token axis."""
    if shape == spec.kernel_shape:
        return True
    return spec.vocab_axis is not None and len(shape) == len(spec.kernel_shape) and all(
        n == want or (axis == spec.vocab_axis and n > want)
        for axis, (n, want) in enumerate(zip(shape, spec.kernel_shape)))


# ----------------------------------------------------------------------------------------------------
# Loading


_READERS: dict[str, Callable[[Path], tuple[LazyState, dict[str, Any]]]] = {
    "hf": open_hf_folder, "llama2c": open_llama2c, "gguf": open_gguf_state}


def read_state(path: str | Path) -> tuple[StateDict, dict[str, Any]]:
    """The whole HF-named float32 state dict and HF config of an HF folder, llama2.c or GGUF checkpoint."""
    lazy, config = _READERS[detect_format(path)](Path(path))
    return {name: np.asarray(t.full(), np.float32) for name, t in lazy.items()}, config


def open_params(path: str | Path, emb_id: int | None = None, **runtime: Any) -> tuple[Params, LlamaConfig]:
    """(params as LazyTensors, LlamaConfig) from any supported checkpoint, with [EMB] given the id `emb_id`
    (`emb_growth`: a new entry, or an unused row of a table padded beyond its tokenizer) and the vocabulary
    padded; nothing but headers is read. `runtime` sets LlamaConfig's runtime fields (compute_dtype,
    param_dtype, scan_layers, remat_policy, attention, vocab_pad_multiple); with scan_layers the layers
    come stacked. `place_params` or `materialise` next."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "orbax":
        cfg = config_from_hf(_read_json(path / "config.json"), path, **runtime)
        n_new, reset = emb_growth(cfg, emb_id, path)
        params = _open_orbax(path, cfg, n_new, reset)
    else:
        state, hf_config = _READERS[fmt](path)
        cfg = config_from_hf(hf_config, path, **runtime)
        n_new, reset = emb_growth(cfg, emb_id, path)
        params = hf_to_params(state, cfg, str(path), n_new, reset)
    cfg = cfg.replace(vocab_size=cfg.vocab_size + n_new)
    return (stack_layers(params, stack=Stacked) if cfg.scan_layers else params), cfg


def materialise(params: Params, dtype: Any = np.float32) -> Params:
    """LazyTensors -> whole host arrays of `dtype` (small models, tools; large ones: `place_params`)."""
    return jax.tree.map(lambda t: np.asarray(t.full()).astype(dtype), params)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _release_freed_heap() -> None:
    """Hand the heap's freed pages back to the OS (glibc `malloc_trim`; a no-op elsewhere). Each parameter's
    slices are read into temporaries of mixed sizes; glibc keeps freed heap memory of such a pattern, so
    without this the loader's RSS grew by about 12% of the model beyond the placed parameters
    (bench/load_memory.py)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def place_params(params: Params, abstract: Params, on_leaf: Callable[[str], None] | None = None) -> Params:
    """LazyTensors -> global jax.Arrays laid out as `abstract` (ShapeDtypeStructs with shardings), cast to
    its dtypes. Each process reads from disk only the slices of its own devices, one parameter at a time;
    `on_leaf(name)` runs after each parameter is placed (a hook for memory checks)."""
    def place(path, tensor: LazyTensor, target: jax.ShapeDtypeStruct) -> jax.Array:
        name = jax.tree_util.keystr(path)
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(f"parameter {name}: checkpoint gives shape {tensor.shape}, the model expects "
                                  f"{target.shape}")
        # One device at a time (not make_array_from_callback, which reads every shard before the first
        # transfer): the host holds at most one shard of one parameter beyond what is already placed.
        dtype = np.dtype(target.dtype)
        shards = [jax.device_put(tensor.read(index).astype(dtype, copy=False), device)
                  for device, index in target.sharding.addressable_devices_indices_map(target.shape).items()]
        array = jax.make_array_from_single_device_arrays(target.shape, target.sharding, shards)
        _release_freed_heap()
        if on_leaf is not None:
            on_leaf(name)
        return array

    return jax.tree_util.tree_map_with_path(place, params, abstract)


def load_params(path: str | Path, **runtime: Any) -> tuple[Params, LlamaConfig]:
    """(params, LlamaConfig) from any supported checkpoint, as whole host arrays of the config's
    param_dtype (with scan_layers the layers come stacked)."""
    params, cfg = open_params(path, **runtime)
    return materialise(params, jnp.dtype(cfg.param_dtype)), cfg


def load_causal_lm(path: str | Path, mesh: jax.sharding.Mesh | None = None, **runtime: Any) -> CausalLM:
    """Load an HF folder, llama2.c .bin, .gguf or orbax folder (format detected) as a CausalLM; with `mesh`
    the weights are born sharded over it (`place_params`), otherwise read whole onto one device."""
    if mesh is None:
        params, cfg = load_params(path, **runtime)
        return CausalLM(params, cfg)
    lazy, cfg = open_params(path, **runtime)
    return CausalLM(place_params(lazy, sharded_abstract_params(cfg, mesh)), cfg, mesh)
