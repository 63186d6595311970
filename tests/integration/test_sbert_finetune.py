"""SentenceBERT fine-tuning on NoteLLM's terms: the duplicate-aware loss (torch) equals NoteLLM's contrastive
loss (JAX, itself checked against numpy in test_losses.py) in value and gradient, and the schedule takes the
NoteLLM recipe's pairs, batch and epochs."""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import notellm_jax  # noqa: F401
from notellm_jax.eval.baselines import SBERT_SCALE, duplicate_aware_infonce, finetune_schedule, pair_batches
from notellm_jax.config import load_config, override
from notellm_jax.model.notellm import contrastive_loss

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.py")


@pytest.mark.parametrize("pairs", [[("A", "B"), ("B", "A"), ("A", "C"), ("D", "E")],
                                   [("A", "B"), ("C", "D"), ("E", "F")]])
def test_duplicate_aware_infonce_equals_notellm_loss_and_gradient(pairs):
    rng = np.random.default_rng(len(pairs))
    a, b = (rng.normal(size=(len(pairs), 5)) for _ in range(2))
    note_a, note_b = [p[0] for p in pairs], [p[1] for p in pairs]
    ta, tb = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (a, b))
    loss = duplicate_aware_infonce(ta, tb, note_a, note_b, SBERT_SCALE)
    loss.backward()
    ids = {n: i for i, n in enumerate(sorted(set(note_a + note_b)))}
    note_index = jnp.asarray([ids[n] for n in note_a + note_b], jnp.int32)
    pair_id = jnp.asarray(np.tile(np.arange(len(pairs)), 2), jnp.int32)

    def jax_loss(x):
        unit = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
        return contrastive_loss(unit, pair_id, jnp.log(SBERT_SCALE), note_index)[0]

    want, grad = jax.value_and_grad(jax_loss)(jnp.asarray(np.concatenate([a, b]), jnp.float32))
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    got_grad = np.concatenate([ta.grad.numpy(), tb.grad.numpy()])
    np.testing.assert_allclose(got_grad, np.asarray(grad), rtol=1e-4, atol=1e-6)


def test_schedule_follows_the_notellm_recipe_unless_set():
    config = load_config(TINY)  # batch 8 pairs, 12 epochs
    assert finetune_schedule(config, 64) == (8, 96)
    assert finetune_schedule(override(config, {"baselines.sbert_finetune_steps": 5,
                                               "baselines.sbert_finetune_batch_pairs": 4}), 64) == (4, 5)
    with pytest.raises(ValueError, match="no batch of 8 pairs"):
        finetune_schedule(config, 7)


def test_pair_batches_cover_every_pair_once_per_epoch_in_a_new_order():
    pairs = [(str(i), str(i + 100)) for i in range(10)]
    batches = list(pair_batches(pairs, 3, 6, seed=0))  # 3 whole batches per epoch, 2 epochs
    first, second = sum(batches[:3], []), sum(batches[3:], [])
    assert len(set(first)) == 9 and len(set(second)) == 9 and first != second
    assert batches == list(pair_batches(pairs, 3, 6, seed=0))
