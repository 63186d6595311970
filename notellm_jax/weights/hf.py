"""Hugging Face checkpoints: the safetensors reader, the HF folder, the writer, and the one mapping between
HF tensor names and the Flax parameter tree.

An HF folder is config.json + model.safetensors, or shards listed in model.safetensors.index.json. Every
reader (llama2.c and GGUF too) yields HF-named lazy tensors plus an HF config dict; `hf_to_params` maps them
to the Flax tree (torch Linear [out, in] -> kernel, heads split out, the token tables grown by [EMB] and
padded) and `params_to_hf` maps back, so the layout logic lives in one place whatever the source.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from notellm_jax.errors import CheckpointError, MissingInputError
from notellm_jax.model.families import LlamaConfig
from notellm_jax.model.params import unstack_layers
from notellm_jax.weights.lazy import (ArrayTensor, Index, Kernel, LazyState, LazyTensor, StateDict, VocabGrown,
                                      index_ranges)

logger = logging.getLogger(__name__)

Params = dict[str, Any]

HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"


def read_json(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON object (config.json, the shard index), with clear errors when missing or broken."""
    if not path.is_file():
        raise MissingInputError(f"missing {path.name} in {path.parent}")
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


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
            ranges = index_ranges(index, self.shape)
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


def _open_safetensors(path: Path) -> dict[str, LazyTensor]:
    """Names, shapes, dtypes and data offsets from the header; no tensor data is read until a slice is."""
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
    config = read_json(folder / "config.json")
    if not (folder / HF_INDEX).is_file():
        return _open_safetensors(folder / HF_WEIGHTS), config
    weight_map = read_json(folder / HF_INDEX).get("weight_map")
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


@dataclasses.dataclass(frozen=True)
class TensorSpec:
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


def tensor_specs(cfg: LlamaConfig) -> list[TensorSpec]:
    x, m, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    h, k, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    specs = [TensorSpec("model.embed_tokens.weight", ("embed_tokens", "embedding"), (v, x), (v, x), False)]
    for i in range(cfg.num_hidden_layers):
        hf, tree = f"model.layers.{i}.", f"layers_{i}"
        specs += [
            TensorSpec(hf + "input_layernorm.weight", (tree, "input_norm", "scale"), (x,), (x,), False),
            TensorSpec(hf + "self_attn.q_proj.weight", (tree, "attn", "q_proj", "kernel"), (h * d, x), (x, h, d), True),
            TensorSpec(hf + "self_attn.k_proj.weight", (tree, "attn", "k_proj", "kernel"), (k * d, x), (x, k, d), True),
            TensorSpec(hf + "self_attn.v_proj.weight", (tree, "attn", "v_proj", "kernel"), (k * d, x), (x, k, d), True),
            TensorSpec(hf + "self_attn.o_proj.weight", (tree, "attn", "o_proj", "kernel"), (x, h * d), (h, d, x), True),
            TensorSpec(hf + "post_attention_layernorm.weight", (tree, "post_attn_norm", "scale"), (x,), (x,), False),
            TensorSpec(hf + "mlp.gate_proj.weight", (tree, "mlp", "gate_proj", "kernel"), (m, x), (x, m), True),
            TensorSpec(hf + "mlp.up_proj.weight", (tree, "mlp", "up_proj", "kernel"), (m, x), (x, m), True),
            TensorSpec(hf + "mlp.down_proj.weight", (tree, "mlp", "down_proj", "kernel"), (x, m), (m, x), True),
        ]
        specs += _attention_extras(cfg, hf + "self_attn.", (tree, "attn"))
        if cfg.sandwich_norms:  # Gemma: HF's post_attention_layernorm normalises the attention output
            specs += [TensorSpec(f"{hf}{name}.weight", (tree, ours, "scale"), (x,), (x,), False) for name, ours in
                      (("pre_feedforward_layernorm", "pre_mlp_norm"), ("post_feedforward_layernorm", "post_mlp_norm"))]
    specs.append(TensorSpec("model.norm.weight", ("norm", "scale"), (x,), (x,), False))
    if not cfg.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", ("lm_head", "kernel"), (v, x), (x, v), True))
    return specs


def _attention_extras(cfg: LlamaConfig, hf: str, tree: tuple[str, ...]) -> list[TensorSpec]:
    """Projection biases (Qwen2; LLaMA/Qwen3 with attention_bias) and Qwen3's per-head q/k norms."""
    h, k, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    specs = []
    if cfg.attention_bias:
        specs += [TensorSpec(f"{hf}{proj}.bias", (*tree, proj, "bias"), (n * d,), (n, d), False)
                  for proj, n in (("q_proj", h), ("k_proj", k), ("v_proj", k))]
    if cfg.attention_out_bias:
        specs.append(TensorSpec(hf + "o_proj.bias", (*tree, "o_proj", "bias"), (cfg.hidden_size,),
                                 (cfg.hidden_size,), False))
    if cfg.qk_norm:
        specs += [TensorSpec(f"{hf}{norm}.weight", (*tree, norm, "scale"), (d,), (d,), False)
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
    specs = tensor_specs(cfg)
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
    for spec in tensor_specs(cfg):
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


def save_hf(params: Params, cfg: LlamaConfig, out_dir: str | Path) -> Path:
    """config.json + generation_config.json + model.safetensors loadable by the family's transformers class
    (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM, Gemma2ForCausalLM,
    Gemma3ForCausalLM: `cfg.model_type`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(params_to_hf(params, cfg), out_dir / HF_WEIGHTS, metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out_dir
