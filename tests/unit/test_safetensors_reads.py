"""`SafetensorsTensor.read` (positional reads of row blocks) equals numpy slicing of the tensor as torch
wrote it, for every slice shape the shardings produce (row ranges, column ranges, strides, scalars), in
float32 and bfloat16, with blocks far smaller than a tensor; a file cut short is a CheckpointError."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from notellm_jax.errors import CheckpointError
from notellm_jax.weights import hf
from notellm_jax.weights.hf import _open_safetensors

SLICES = [
    (slice(None), slice(None)),
    (slice(3, 17), slice(None)),
    (slice(None), slice(8, 16)),  # a shard of the second axis: every row, a few columns
    (slice(5, 40, 3), slice(1, 30, 4)),
    (slice(0, 1), slice(31, 32)),
]


@pytest.fixture
def file(tmp_path, monkeypatch):
    monkeypatch.setattr(hf.SafetensorsTensor, "BLOCK_BYTES", 200)  # a few rows per block
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(41, 32, generator=g), "b": torch.randn(41, 32, generator=g).to(torch.bfloat16),
               "c": torch.randn(6, 4, 5, generator=g), "s": torch.tensor(2.5)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, path)
    return path, {k: (v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()) for k, v in tensors.items()}


@pytest.mark.parametrize("index", SLICES)
def test_slices_equal_numpy(file, index):
    path, want = file
    lazy = _open_safetensors(path)
    np.testing.assert_array_equal(lazy["a"].read(index), want["a"][index])
    got = lazy["b"].read(index)
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.astype(np.float32), want["b"][index])


def test_three_axes_and_scalar(file):
    path, want = file
    lazy = _open_safetensors(path)
    index = (slice(1, 6, 2), slice(None), slice(2, 5))
    np.testing.assert_array_equal(lazy["c"].read(index), want["c"][index])
    assert lazy["s"].shape == () and float(lazy["s"].full()) == 2.5


def test_file_cut_short_is_a_checkpoint_error(file, tmp_path):
    path, _ = file
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-64])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        _open_safetensors(cut)["a"].full()
