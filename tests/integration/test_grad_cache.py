"""The two-pass GradCache step equals the full-batch step (8 fake CPU devices, fp32).

Both runs use the trainer's own pieces on the random stories260K-shaped model and the same synthetic global
batch (with a repeated note, so the duplicate mask is on the path); only `train.grad_cache_chunk` differs.
Compared: the metrics, every gradient, and the parameters after one optimiser step.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import jax
import numpy as np
import pytest

import notellm_jax  # noqa: F401
from notellm_jax.config import load_config, override
from notellm_jax.errors import ConfigError
from notellm_jax.model.notellm import notellm_losses
from notellm_jax.sharding import make_mesh
from notellm_jax.data.input_pipeline import synthetic_batches
from notellm_jax.model.params import merge_params
from notellm_jax.train.step import apply_model, create_state, loss_and_grads, make_train_setup, to_global_batch
from notellm_jax.weights.loading import load_initial_params
from step_compare import assert_same_grads, assert_same_metrics, assert_same_updates, one_step

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.py") + ":random"
OVERRIDES = ["train.synthetic_data=true", "prompt.max_length=16", "prompt.title_max_tokens=4",
             "prompt.content_max_tokens=8", "prompt.max_targets=4", "train.batch_pairs=8", "train.max_steps=2",
             "train.warmup_fraction=0", "train.learning_rate=3e-3"]


def _setup(config, mesh_shape):
    params, llama_cfg = load_initial_params(config, None)
    spec = make_train_setup(config, llama_cfg, make_mesh(*mesh_shape), config.train.max_steps)
    local = next(synthetic_batches(config, llama_cfg, 0))
    b = config.train.batch_pairs
    local["note_index"][b] = local["note_index"][1]  # pair 0's second note is also pair 1's first note
    return params, spec, local


def _run(config, mesh_shape):
    """(metrics, grads, parameter update after one optimiser step) on the fixed batch; one compilation."""
    params, spec, local = _setup(config, mesh_shape)
    return one_step(spec, create_state(spec, params), to_global_batch(spec, local))


@pytest.mark.slow
@pytest.mark.parametrize("extra,chunk,mesh_shape", [
    ({}, 4, (2, 4, 1)),
    ({"model.train_top_layers": 2}, 8, (1, 4, 2)),  # the frozen bottom runs inside each chunk; tensor axis
    # 64 pairs (127 negatives per note) in chunks of 32 rows, with the attention and pooling levers on
    ({"train.batch_pairs": 64, "model.prefix_bidirectional": True, "model.pooling": "attention"}, 32, (1, 8, 1)),
], ids=["notellm_chunk4", "top2_chunk8", "levers_64pairs_chunk32"])
def test_grad_cache_step_equals_full_batch_step(extra, chunk, mesh_shape):
    full = override(load_config(TINY, OVERRIDES), extra)
    cached = override(full, {"train.grad_cache_chunk": chunk})
    want_metrics, want_grads, want_update = _run(full, mesh_shape)
    got_metrics, got_grads, got_update = _run(cached, mesh_shape)
    assert_same_metrics(got_metrics, want_metrics)
    assert want_metrics["loss_gen"] > 0 and want_metrics["loss_cl"] > 0
    assert_same_grads(got_grads, want_grads)
    assert_same_updates(got_update, want_update)


@pytest.mark.slow
def test_gcl_only_step_skips_the_head_with_the_same_gradients():
    """A "gcl_only" (w/o CSFT) step computes no LM head and reports no train loss_gen; its gradients equal
    those of L_cl through the forward pass that does compute the logits, full-batch and GradCache alike."""
    config = override(load_config(TINY, OVERRIDES), {"train.objective": "gcl_only"})
    params, spec, local = _setup(config, (2, 4, 1))
    state = create_state(spec, params)
    batch = to_global_batch(spec, local)

    def reference(state, batch):
        def loss_fn(trainable):
            out = apply_model(spec, merge_params(trainable, state.frozen), batch, with_logits=True)
            metrics = notellm_losses(out, batch, spec.loss.alpha, "gcl_only")
            return metrics["loss"], metrics
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return metrics, grads

    reference_jit = jax.jit(reference)
    skipping_jit = jax.jit(partial(loss_and_grads, setup=spec))
    want_metrics, want_grads = jax.device_get(reference_jit(state, batch))
    got_metrics, got_grads = jax.device_get(skipping_jit(state, batch))
    assert want_metrics["loss_gen"] > 0 and "loss_gen" not in got_metrics
    for key in got_metrics:
        np.testing.assert_allclose(got_metrics[key], want_metrics[key], rtol=1e-5, err_msg=key)
    assert_same_grads(got_grads, want_grads, every_tensor_trained=False)  # the head gets no gradient
    # The skipped head and last-layer rows are work the compiled step no longer does (on this toy model the
    # head is small: 512 words x 64 wide, 4 targets per note).
    flops = [f.lower(state, batch).compile().cost_analysis()["flops"] for f in (skipping_jit, reference_jit)]
    assert flops[0] < flops[1], flops

    cached = override(config, {"train.grad_cache_chunk": 4})
    spec_cached = make_train_setup(cached, spec.model.llama, spec.mesh, cached.train.max_steps)
    got_metrics, got_grads = jax.device_get(jax.jit(partial(loss_and_grads, setup=spec_cached))(state, batch))
    assert "loss_gen" not in got_metrics
    np.testing.assert_allclose(got_metrics["loss_cl"], want_metrics["loss_cl"], rtol=1e-5)
    assert_same_grads(got_grads, want_grads, every_tensor_trained=False)  # the head gets no gradient


def test_grad_cache_chunk_must_divide_the_batch():
    config = override(load_config(TINY, OVERRIDES), {"train.grad_cache_chunk": 5})
    with pytest.raises(ConfigError, match="grad_cache_chunk=5 must divide the 2 x 8 notes"):
        config.validate(8, training=True)
