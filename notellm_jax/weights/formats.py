"""Weights in and out of the project's Flax LLaMA (`notellm_jax.model.llama`): the front door to the
checkpoint formats.

`detect_format` tells the format of a path; each format has its reader, which yields HF-named lazy tensors
(`weights.lazy`) and an HF config dict, mapped to the Flax tree in one place (`weights.hf.hf_to_params`):

- Hugging Face folder (`weights.hf`): config.json + model.safetensors, or shards listed in
  model.safetensors.index.json; written by `weights.hf.save_hf`.
- llama2.c legacy .bin (`weights.llama2c`, e.g. stories260K).
- GGUF (`weights.gguf`, e.g. SmolLM2-135M-Instruct.Q4_1): dequantised per slice with the `gguf` package.
- orbax folder (`weights.orbax`): config.json + `params/`, the project's own format (`save_orbax`).

Readers are lazy, so `place_params` builds each global array from only the slices a process's devices
hold: no host or device ever holds the whole model on the way to being sharded.

Public API: `load_causal_lm(path) -> CausalLM` (logits, greedy generate with the KV cache),
`open_params(path) -> (lazy params, LlamaConfig)`, `place_params`, `load_params(path) -> (params,
LlamaConfig)`, `materialise`, `read_state`.
"""
from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from notellm_jax.errors import CheckpointError, MissingInputError
from notellm_jax.model.decode import CausalLM
from notellm_jax.model.families import LlamaConfig, config_from_hf
from notellm_jax.model.params import emb_growth, sharded_abstract_params, stack_layers
from notellm_jax.weights.gguf import open_gguf_state
from notellm_jax.weights.hf import HF_INDEX, HF_WEIGHTS, Params, hf_to_params, open_hf_folder, read_json
from notellm_jax.weights.lazy import LazyState, LazyTensor, Stacked, StateDict
from notellm_jax.weights.llama2c import open_llama2c
from notellm_jax.weights.orbax import ORBAX_PARAMS, open_orbax


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
        cfg = config_from_hf(read_json(path / "config.json"), path, **runtime)
        n_new, reset = emb_growth(cfg, emb_id, path)
        params = open_orbax(path, cfg, n_new, reset)
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
