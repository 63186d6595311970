"""The one batch spec (`notellm_jax.model.batch`) and everything derived from it agree: the step's keys,
the example batch of shape inference, the synthetic batches, `notellm plan`'s abstract batch and the
global batch the step receives (keys, dtypes, shapes)."""
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from notellm_jax.config import load_config
from notellm_jax.data.input_pipeline import synthetic_batches
from notellm_jax.model.batch import (BATCH_SPEC, PIPELINE_KEYS, STEP_KEYS, BatchDims, as_step_arrays, batch_shapes,
                                     check_batch)
from notellm_jax.model.families import preset
from notellm_jax.model.notellm import pack_head_rows
from notellm_jax.model.params import example_batch
from notellm_jax.tools.plan import abstract_batch
from notellm_jax.sharding import make_mesh

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.py") + ":random"
PAIRS, LENGTH, TARGETS = 4, 24, 3


@pytest.fixture(scope="module")
def config():
    return load_config(TINY, [f"train.batch_pairs={PAIRS}", f"prompt.max_length={LENGTH}",
                              f"prompt.max_targets={TARGETS}", "train.synthetic_data=true"])


def described(batch: dict) -> dict:
    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in batch.items()}


def test_the_step_reads_every_key_of_the_spec_and_the_pipeline_keys_are_among_them():
    assert STEP_KEYS == tuple(BATCH_SPEC)
    assert set(PIPELINE_KEYS) <= set(STEP_KEYS)
    assert set(STEP_KEYS) - set(PIPELINE_KEYS) == {"hidden_in", "head_index", "head_target_ids", "head_target_mask"}


def test_example_batch_follows_the_spec():
    assert described(example_batch(3, 10, 4)) == batch_shapes(BatchDims(3, 10, 4))
    assert described(example_batch()) == batch_shapes(BatchDims(2, 8, 2))


def test_synthetic_batches_follow_the_spec(config):
    dims = BatchDims(2 * PAIRS, LENGTH, TARGETS)
    batch = next(synthetic_batches(config, preset("tiny"), 0))
    check_batch(batch, dims)
    assert described(batch) == batch_shapes(dims)


def test_plans_abstract_batch_follows_the_spec(config):
    setup = SimpleNamespace(mesh=make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    abstract = abstract_batch(config, setup)
    assert described(abstract) == batch_shapes(BatchDims(2 * PAIRS, LENGTH, TARGETS))
    assert all(a.sharding is not None for a in abstract.values())


def test_packed_head_rows_and_features_follow_the_spec(config):
    """The keys that replace others on the way to the device (head packing, the feature cache)."""
    batch = next(synthetic_batches(config, preset("tiny"), 0))
    packed = pack_head_rows(batch["target_mask"], batch["target_ids"], TARGETS)
    dims = BatchDims(2 * PAIRS, LENGTH, TARGETS, hidden=16, head_rows=TARGETS * 2 * PAIRS)
    features = {"hidden_in": np.zeros((2 * PAIRS, LENGTH, 16), np.float32)}
    keys = ("head_index", "head_target_ids", "head_target_mask", "hidden_in")
    assert described({**packed, **features}) == batch_shapes(dims, keys)


def test_step_arrays_keep_the_spec_keys_in_the_spec_dtypes(config):
    batch = next(synthetic_batches(config, preset("tiny"), 0))
    host = {**batch, "note_index": batch["note_index"].astype(np.int64), "task": np.array(["a"] * 2 * PAIRS)}
    out = as_step_arrays(host)
    assert described(out) == batch_shapes(BatchDims(2 * PAIRS, LENGTH, TARGETS))
    np.testing.assert_array_equal(out["note_index"], batch["note_index"])


def test_a_batch_off_the_spec_is_named():
    batch = dict(example_batch(2, 8, 2))
    batch["target_mask"] = np.zeros((2, 2), np.int32)
    with pytest.raises(ValueError, match="target_mask"):
        check_batch(batch, BatchDims(2, 8, 2))
