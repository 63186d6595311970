"""The packed LM head (train.head_rows_per_note): the head runs only at the batch's supervised slots, packed
across its notes, and the step equals the unpacked one (8 fake CPU devices, fp32): metrics, every gradient
and the parameters after one optimiser step. A batch that does not fit runs unpacked; nothing is dropped."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import notellm_jax  # noqa: F401
from notellm_jax.config import load_config, override
from notellm_jax.data.input_pipeline import synthetic_batches
from notellm_jax.errors import ConfigError
from notellm_jax.model.notellm import pack_head_rows
from notellm_jax.sharding import make_mesh
from notellm_jax.train.step import create_state, make_train_setup, to_global_batch
from notellm_jax.weights.loading import load_initial_params
from step_compare import assert_same_grads, assert_same_metrics, assert_same_updates, one_step, sparse_targets

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.py") + ":random"
OVERRIDES = ["train.synthetic_data=true", "prompt.max_length=16", "prompt.title_max_tokens=4",
             "prompt.content_max_tokens=8", "prompt.max_targets=4", "train.batch_pairs=8", "train.max_steps=2",
             "train.warmup_fraction=0", "train.learning_rate=3e-3", "train.alpha=0.5"]


def test_pack_head_rows_against_numpy():
    rng = np.random.default_rng(0)
    mask = (rng.random((6, 5)) < 0.3).astype(np.float32)
    ids = rng.integers(0, 100, size=(6, 5))
    packed = pack_head_rows(mask, ids, rows_per_note=2)
    slots = [(i, j) for i in range(6) for j in range(5) if mask[i, j]]
    assert packed["head_index"].shape == (12,) and int(packed["head_target_mask"].sum()) == len(slots)
    for c, (i, j) in enumerate(slots):
        assert packed["head_index"][c] == i * 5 + j and packed["head_target_ids"][c] == ids[i, j]
    assert np.all(packed["head_target_mask"][len(slots):] == 0)
    assert pack_head_rows(np.ones((6, 5)), ids, rows_per_note=4) is None  # 30 slots > 24 rows: unpacked


def _run(config, mesh_shape, local):
    """(keys of the device batch, metrics, grads, parameter update after one optimiser step)."""
    params, llama_cfg = load_initial_params(config, None)
    spec = make_train_setup(config, llama_cfg, make_mesh(*mesh_shape), config.train.max_steps)
    batch = to_global_batch(spec, local)
    return set(batch), *one_step(spec, create_state(spec, params), batch)


@pytest.mark.slow
@pytest.mark.parametrize("extra,mesh_shape,most", [
    ({}, (2, 4, 1), 3),
    ({"model.train_top_layers": 2}, (1, 4, 2), 2),    # tensor axis: the head's vocabulary is sharded
    ({}, (2, 4, 1), 4),                              # does not fit 2 rows per note: the unpacked step
    # Gemma 2's tied, soft-capped head (and its window, sandwich norms and scaled embedding)
    ({"model.checkpoint": "random:tiny_gemma2", "model.train_top_layers": 2}, (1, 4, 2), 2),
], ids=["packed", "packed_top2_tensor", "overflow_unpacked", "gemma2_softcapped_tied_head"])
def test_packed_head_step_equals_unpacked_step(extra, mesh_shape, most):
    unpacked = override(load_config(TINY, OVERRIDES), extra)
    packed = override(unpacked, {"train.head_rows_per_note": 2})
    params, llama_cfg = load_initial_params(unpacked, None)
    local = sparse_targets(next(synthetic_batches(unpacked, llama_cfg, 0)), seed=1, most=most)
    fits = np.count_nonzero(local["target_mask"]) <= 2 * local["target_mask"].shape[0]
    want_keys, want_metrics, want_grads, want_update = _run(unpacked, mesh_shape, local)
    got_keys, got_metrics, got_grads, got_update = _run(packed, mesh_shape, local)
    assert ("head_index" in got_keys) == fits and "head_index" not in want_keys
    assert_same_metrics(got_metrics, want_metrics)
    assert want_metrics["loss_gen"] > 0
    assert_same_grads(got_grads, want_grads)
    assert_same_updates(got_update, want_update)


@pytest.mark.parametrize("extra,message", [
    ({"train.head_rows_per_note": 5}, "head_rows_per_note=5 must be in \\[0, prompt.max_targets\\]"),
    ({"train.head_rows_per_note": 2, "train.grad_cache_chunk": 4}, "are alternatives"),
])
def test_head_rows_per_note_config_errors(extra, message):
    config = override(load_config(TINY, OVERRIDES), extra)
    with pytest.raises(ConfigError, match=message):
        config.validate(8, training=True)


def test_head_rows_per_note_needs_one_process():
    config = override(load_config(TINY, OVERRIDES), {"train.head_rows_per_note": 2})
    with pytest.raises(ConfigError, match="multi-process"):
        config.validate(8, process_count=2, training=True)
