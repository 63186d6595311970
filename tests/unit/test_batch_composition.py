"""The levers' config rules and train.batch_by_category's batch order (`category_order`, against a direct count)."""
from pathlib import Path

import numpy as np
import pytest

from notellm_jax.config import Config, load_config, override
from notellm_jax.data.input_pipeline import category_order
from notellm_jax.errors import ConfigError


@pytest.mark.parametrize("b", [1, 3, 4])
def test_category_order_is_a_permutation_of_same_category_batches_then_mixed_ones(b):
    categories = np.array(list("aaaaaaabbbbbcdd"))  # 7 a, 5 b, 1 c, 2 d
    order = category_order(categories, b, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(len(categories)))
    batches = order[:len(order) // b * b].reshape(-1, b)
    assert len(batches) == len(categories) // b  # as many steps as a plain permutation
    whole = sum(n // b for n in (7, 5, 1, 2))
    single = [len(set(categories[row])) == 1 for row in batches]
    assert sum(single) >= whole
    leftover_pairs = sum(n % b for n in (7, 5, 1, 2))
    assert len(batches) - whole == leftover_pairs // b  # the pooled rest fills the remaining batches


def test_category_order_depends_on_the_seed_only():
    categories = np.array(list("aabbbbcc"))
    one = category_order(categories, 2, np.random.default_rng(3))
    np.testing.assert_array_equal(one, category_order(categories, 2, np.random.default_rng(3)))


def test_levers_config_validation():
    with pytest.raises(ConfigError, match="model.pooling .max.: one of"):
        override(Config(), {"model.pooling": "max"}).validate(1)
    with pytest.raises(ConfigError, match="batch_by_category"):
        override(Config(), {"train.batch_by_category": True}).validate(1)
    for weight, message in ((1.0, "must be in"), (0.2, "numpy input")):
        with pytest.raises(ConfigError, match=message):
            override(Config(), {"train.self_positive_weight": weight}).validate(1)
    override(Config(), {"train.batch_by_category": True, "data.train_input": "numpy", "model.pooling": "attention",
                        "train.self_positive_weight": 0.25,
                        "model.prefix_bidirectional": True, "model.lora_rank": 4,
                        "model.train_top_layers": 2}).validate(1)


def test_accelerator_recipe_validates_with_every_lever():
    """configs/smollm2_se.py:full (scanned layers, numpy input) takes each lever: the bidirectional prefix from
    layer 0, both poolings, category batches, self-positives."""
    config = load_config(str(Path(__file__).resolve().parents[2] / "configs" / "smollm2_se.py") + ":full")
    for updates in ({"model.prefix_bidirectional": True}, {"model.pooling": "mean"}, {"model.pooling": "attention"},
                    {"train.batch_by_category": True, "train.self_positive_weight": 0.1}):
        override(config, updates).validate(8, training=True)
