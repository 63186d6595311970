"""The packed LM head (train.head_rows_per_note): the head runs only at the batch's supervised slots, packed
across its notes, and the step equals the unpacked one (8 fake CPU devices, fp32): metrics, every gradient
and the parameters after one optimiser step. A batch that does not fit runs unpacked; nothing is dropped."""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

import notellm_jax  # noqa: F401
from notellm_jax.config import load_config, override
from notellm_jax.data.input_pipeline import synthetic_batches
from notellm_jax.errors import ConfigError
from notellm_jax.model.notellm import pack_head_rows
from notellm_jax.sharding import make_mesh
from notellm_jax.train.step import compile_steps, create_state, loss_and_grads, make_train_setup, to_global_batch, train_step
from notellm_jax.weights.loading import load_initial_params

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.py") + ":random"
OVERRIDES = ["train.synthetic_data=true", "prompt.max_length=16", "prompt.title_max_tokens=4",
             "prompt.content_max_tokens=8", "prompt.max_targets=4", "train.batch_pairs=8", "train.max_steps=2",
             "train.warmup_fraction=0", "train.learning_rate=3e-3", "train.alpha=0.5"]


def _sparse_targets(local: dict, seed: int, most: int = 3) -> dict:
    """The synthetic batch with 1..`most` supervised slots per note (real batches fill ~20% of them)."""
    rng = np.random.default_rng(seed)
    n, m = local["target_mask"].shape
    counts = rng.integers(1, most + 1, size=n)
    return {**local, "target_mask": (np.arange(m)[None, :] < counts[:, None]).astype(np.float32)}


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
    params, llama_cfg = load_initial_params(config, None)
    spec = make_train_setup(config, llama_cfg, make_mesh(*mesh_shape), config.train.max_steps)
    state = create_state(spec, params)
    batch = to_global_batch(spec, local)

    @jax.jit
    def grads_and_step(state, batch):
        metrics, grads = loss_and_grads(state, batch, setup=spec)
        return metrics, grads, train_step(state, batch, setup=spec)[0].params

    before = jax.device_get(state.params)
    metrics, grads, after = jax.device_get(grads_and_step(state, batch))
    update = jax.tree.map(lambda new, old: np.asarray(new, np.float64) - old, after, before)
    return set(batch), metrics, grads, update


def _relative_l2(got, want) -> float:
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


@pytest.mark.slow
@pytest.mark.parametrize("extra,mesh_shape,most", [
    ({}, (2, 4, 1), 3),
    ({"model.train_top_layers": 2}, (1, 4, 2), 2),    # tensor axis: the head's vocabulary is sharded
    ({}, (2, 4, 1), 4),                              # does not fit 2 rows per note: the unpacked step
], ids=["packed", "packed_top2_tensor", "overflow_unpacked"])
def test_packed_head_step_equals_unpacked_step(extra, mesh_shape, most):
    unpacked = override(load_config(TINY, OVERRIDES), extra)
    packed = override(unpacked, {"train.head_rows_per_note": 2})
    params, llama_cfg = load_initial_params(unpacked, None)
    local = _sparse_targets(next(synthetic_batches(unpacked, llama_cfg, 0)), seed=1, most=most)
    fits = np.count_nonzero(local["target_mask"]) <= 2 * local["target_mask"].shape[0]
    want_keys, want_metrics, want_grads, want_update = _run(unpacked, mesh_shape, local)
    got_keys, got_metrics, got_grads, got_update = _run(packed, mesh_shape, local)
    assert ("head_index" in got_keys) == fits and "head_index" not in want_keys
    assert got_metrics.keys() == want_metrics.keys()
    for key in want_metrics:
        np.testing.assert_allclose(got_metrics[key], want_metrics[key], rtol=1e-5, err_msg=key)
    assert want_metrics["loss_gen"] > 0
    for (path, g), (_, w) in zip(jax.tree_util.tree_leaves_with_path(got_grads),
                                 jax.tree_util.tree_leaves_with_path(want_grads), strict=True):
        scale = float(np.max(np.abs(w)))
        assert scale > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-5 * scale, err_msg=jax.tree_util.keystr(path))
    for (path, g), (_, w) in zip(jax.tree_util.tree_leaves_with_path(got_update),
                                 jax.tree_util.tree_leaves_with_path(want_update)):
        assert _relative_l2(g, w) < 2e-3, (jax.tree_util.keystr(path), _relative_l2(g, w))


def test_packed_step_compiles_once_over_batches_of_different_fill():
    config = override(load_config(TINY, OVERRIDES), {"train.head_rows_per_note": 3})
    params, llama_cfg = load_initial_params(config, None)
    setup = make_train_setup(config, llama_cfg, make_mesh(1, 4, 1, devices=jax.devices()[:4]), total_steps=10)
    state = create_state(setup, params)
    step_fn, eval_fn = compile_steps(setup)
    data = synthetic_batches(config, llama_cfg, 0)
    for i in range(3):
        state, metrics = step_fn(state, to_global_batch(setup, _sparse_targets(next(data), seed=i, most=3)))
    eval_fn(state, to_global_batch(setup, _sparse_targets(next(data), seed=5)))
    jax.block_until_ready(metrics)
    assert step_fn._cache_size() == 1 and eval_fn._cache_size() == 1


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
