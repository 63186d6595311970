"""The one batch layout: every array the device step reads, with its dtype and shape rule.

A batch has `rows` = N notes (two per pair, laid out [a..., b...]) of `length` = T tokens, each with
`targets` = M supervised category slots. Two keys replace others on their way to the device: the frozen
bottom's features `hidden_in` [N, T, hidden] replace `input_ids` (the feature cache), and the packed LM-head
slots `head_*` [head_rows] replace `target_ids` / `target_mask` (`notellm.pack_head_rows`). The rest of a
pipeline batch (task, note_id strings) stays on the host.

The step's keys, its global-batch conversion, the example batch of shape inference, the abstract batch of
`notellm plan` and the synthetic batches all derive from `BATCH_SPEC`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

COMPUTE = "compute"  # the dtype of `hidden_in`: the model's compute dtype


@dataclasses.dataclass(frozen=True)
class Field:
    """One batch array: its shape as names of `BatchDims` fields, its dtype, and what it holds."""
    shape: tuple[str, ...]
    dtype: Any
    doc: str


BATCH_SPEC: dict[str, Field] = {
    "input_ids": Field(("rows", "length"), np.int32, "token ids"),
    "hidden_in": Field(("rows", "length", "hidden"), COMPUTE, "frozen bottom's output (replaces input_ids)"),
    "attention_mask": Field(("rows", "length"), np.int32, "1 for real tokens, 0 for padding"),
    "embed_read_pos": Field(("rows",), np.int32, "position whose hidden state gives the [EMB] embedding"),
    "target_positions": Field(("rows", "targets"), np.int32, "positions predicting the category tokens"),
    "target_ids": Field(("rows", "targets"), np.int32, "category token ids"),
    "target_mask": Field(("rows", "targets"), np.float32, "1 for a supervised slot"),
    "pair_id": Field(("rows",), np.int32, "the pair a row belongs to (each id occurs twice)"),
    "note_index": Field(("rows",), np.int32, "the note of a row (masks duplicate negatives)"),
    "head_index": Field(("head_rows",), np.int32, "packed head slots: flat indices into the rows x targets"),
    "head_target_ids": Field(("head_rows",), np.int32, "packed head slots' token ids"),
    "head_target_mask": Field(("head_rows",), np.float32, "packed head slots' mask"),
}
STEP_KEYS = tuple(BATCH_SPEC)
# What the input pipeline (and the synthetic batches) deliver before the feature cache or head packing.
PIPELINE_KEYS = ("input_ids", "attention_mask", "embed_read_pos", "target_positions", "target_ids",
                 "target_mask", "pair_id", "note_index")


@dataclasses.dataclass(frozen=True)
class BatchDims:
    """The sizes the shape rules of `BATCH_SPEC` name."""
    rows: int
    length: int
    targets: int
    hidden: int = 0
    head_rows: int = 0
    compute_dtype: Any = np.float32


def shape_of(key: str, dims: BatchDims) -> tuple[int, ...]:
    return tuple(getattr(dims, name) for name in BATCH_SPEC[key].shape)


def dtype_of(key: str, dims: BatchDims) -> np.dtype:
    dtype = BATCH_SPEC[key].dtype
    return np.dtype(dims.compute_dtype if dtype == COMPUTE else dtype)


def batch_shapes(dims: BatchDims, keys: tuple[str, ...] = PIPELINE_KEYS) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{key: (shape, dtype)} of a batch with `keys`."""
    return {k: (shape_of(k, dims), dtype_of(k, dims)) for k in keys}


def abstract_batch(dims: BatchDims, keys: tuple[str, ...] = PIPELINE_KEYS,
                   sharding_of: Callable[[int], Any] | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of a batch; `sharding_of(ndim)` gives each its sharding (None: no sharding)."""
    return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding_of(len(s)) if sharding_of else None)
            for k, (s, d) in batch_shapes(dims, keys).items()}


def as_step_arrays(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    """The keys of a host batch the step reads, each in its spec dtype (`hidden_in` keeps its own); the
    rest (strings, host bookkeeping) is dropped. E.g. note_index is int64 on the host, int32 on device."""
    out = {}
    for k, v in batch.items():
        if k in BATCH_SPEC:
            v = np.asarray(v)
            dtype = BATCH_SPEC[k].dtype
            out[k] = v if dtype == COMPUTE or v.dtype == dtype else v.astype(dtype)
    return out


def check_batch(batch: dict[str, Any], dims: BatchDims, keys: tuple[str, ...] = PIPELINE_KEYS) -> None:
    """Raises ValueError unless `batch` has exactly `keys`, each with its spec shape and dtype."""
    want = batch_shapes(dims, keys)
    got = {k: (tuple(np.shape(v)), np.dtype(v.dtype)) for k, v in batch.items()}
    if got != want:
        wrong = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        raise ValueError("batch differs from the spec: " +
                         "; ".join(f"{k}: {got.get(k)} != {want.get(k)}" for k in wrong))
