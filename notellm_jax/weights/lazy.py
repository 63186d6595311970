"""Lazy tensors: a shape plus `read(index)` of any rectangular slice.

Every checkpoint reader (`weights.hf`, `weights.llama2c`, `weights.gguf`, `weights.orbax`) returns these
instead of arrays, so a process reads from disk only the slices its devices hold (`formats.place_params`),
and every layout change (transpose, [EMB] rows, vocabulary padding, layer stacking, the RoPE row order of
llama2.c and GGUF Q/K) happens per slice on the host.
"""
from __future__ import annotations

import numpy as np

from notellm_jax.model.params import grow_table

Index = tuple[slice, ...]
StateDict = dict[str, np.ndarray]
LazyState = dict[str, "LazyTensor"]


def index_ranges(index: Index, shape: tuple[int, ...]) -> list[range]:
    """One range per axis of `shape` for `index` (missing trailing axes taken whole)."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return [range(*s.indices(n)) for s, n in zip(index, shape)]


def full_index(shape: tuple[int, ...]) -> Index:
    """The index of a whole tensor of `shape`."""
    return tuple(slice(None) for _ in shape)


class LazyTensor:
    """A shape and `read(index)`: the slice's values as a numpy array, read only when asked for."""
    shape: tuple[int, ...]

    def read(self, index: Index) -> np.ndarray:
        raise NotImplementedError

    def full(self) -> np.ndarray:
        return self.read(full_index(self.shape))


class ArrayTensor(LazyTensor):
    """An in-memory or memory-mapped array (np.memmap pages are read only where sliced)."""

    def __init__(self, array: np.ndarray):
        self.array, self.shape = array, tuple(array.shape)

    def read(self, index: Index) -> np.ndarray:
        return np.array(self.array[tuple(index)])


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
        rows = index_ranges(index, self.shape)[0]
        return _gather(self.base, 0, self.perm[rows.start:rows.stop:rows.step], (slice(None),) + tuple(index)[1:])


class Kernel(LazyTensor):
    """A torch Linear weight [out, in] seen as a Flax kernel: W.T reshaped to `shape`, whose first
    `contract` axes split `in` and the others split `out` (heads out of q/k/v, heads into o_proj)."""

    def __init__(self, base: LazyTensor, shape: tuple[int, ...], contract: int):
        self.base, self.shape, self.contract = base, shape, contract

    def read(self, index: Index) -> np.ndarray:
        ranges = index_ranges(index, self.shape)
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
                index = list(full_index(self.base.shape))
                index[self.axis] = slice(start, min(start + 4096, self.used))
                total = total + self.base.read(tuple(index)).sum(axis=self.axis, keepdims=True, dtype=np.float64)
            self._mean = total / self.used
        return self._mean

    def read(self, index: Index) -> np.ndarray:
        ranges = index_ranges(index, self.shape)
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
        rows, cols = (slice(r.start, r.stop, r.step) for r in index_ranges(index, self.shape))
        return np.ascontiguousarray(self.base.read((cols, rows)).T)


class Stacked(LazyTensor):
    """Per-layer tensors stacked along a new leading axis (the scan layout)."""

    def __init__(self, layers: tuple[LazyTensor, ...]):
        self.layers = tuple(layers)
        self.shape = (len(self.layers),) + self.layers[0].shape

    def read(self, index: Index) -> np.ndarray:
        ranges = index_ranges(index, self.shape)
        rest = tuple(slice(r.start, r.stop, r.step) for r in ranges[1:])
        return np.stack([self.layers[i].read(rest) for i in ranges[0]])


def rotate_half_permutation(rows: int, n_heads: int) -> np.ndarray:
    """perm with rotate_half[r] = interleaved[perm[r]]: Meta's interleaved RoPE pairs (llama2.c, llama.cpp)
    to HF's rotate-half halves, as HF's convert_llama_weights_to_hf does."""
    return np.arange(rows).reshape(n_heads, rows // n_heads // 2, 2).swapaxes(1, 2).reshape(-1)


def interleaved_to_rotate_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Q/K rows of a whole array from the interleaved to the rotate-half layout (`RowPermuted` lazily)."""
    return w[rotate_half_permutation(w.shape[0], n_heads)]


def rope_to_rotate_half(state: LazyState, n_layers: int, n_heads: int, n_kv_heads: int) -> None:
    """Q/K of every layer in `state` seen in the rotate-half layout (`RowPermuted`), in place: llama2.c and
    GGUF store them in Meta's interleaved layout."""
    for i in range(n_layers):
        for proj, heads in (("q_proj", n_heads), ("k_proj", n_kv_heads)):
            key = f"model.layers.{i}.self_attn.{proj}.weight"
            if key in state:  # a missing one is reported by hf_to_params
                state[key] = RowPermuted(state[key], rotate_half_permutation(state[key].shape[0], heads))
