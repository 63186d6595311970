"""The accelerator configs' code paths, executed on CPU: bf16 compute + scanned layers + the shipped remat
policy against the fp32 unscanned step, gradients across remat policies, and one compilation per step.

Random stories260K-shaped model (5 layers, 8 heads on 4 KV heads, tied head), 4 pairs x 32 tokens, one
device. The gradients are taken through the trainer's own loss (`_loss_and_metrics`) on the trainer's
state; scanned parameters are unstacked to the unscanned layout before comparing.

bf16 tolerance: activations, weights as matmul inputs and the PV product are bf16 (8 significant bits)
through 5 layers, while logits, softmax, norms and losses stay float32. Measured: the loss moves by 4e-3
relative and each gradient tensor by at most 2.8e-2 of its norm (the norm scales' gradients; the others
less), so: loss 1e-2 relative, gradient tensors 0.1 relative L2. A missed cast or a broken scan/remat layout
moves these to order 1.
"""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from notellm_jax.config import load_config, override
from notellm_jax.data.input_pipeline import synthetic_batches
from notellm_jax.model.params import unstack_layers
from notellm_jax.sharding import make_mesh
from notellm_jax.train.step import _loss_and_metrics, compile_steps, create_state, make_train_setup, to_global_batch
from notellm_jax.weights.loading import load_initial_params

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.py") + ":random"
OVERRIDES = ["train.synthetic_data=true", "prompt.max_length=32", "prompt.max_targets=4", "train.batch_pairs=4",
             "train.max_steps=3", "train.warmup_fraction=0"]
ACCELERATOR = {"model.compute_dtype": "bfloat16", "model.scan_layers": True,
               "model.remat_policy": "dots_with_no_batch_dims_saveable"}  # configs/paper_7b.py:llama2_7b's choices
BF16_LOSS_RTOL = 1e-2
BF16_GRAD_REL_L2 = 0.1


def setup(updates: dict):
    config = override(load_config(TINY, OVERRIDES), updates)
    params, llama_cfg = load_initial_params(config, None)
    spec = make_train_setup(config, llama_cfg, make_mesh(1, 1, 1, devices=jax.devices()[:1]), 3)
    state = create_state(spec, params)
    batch = to_global_batch(spec, next(synthetic_batches(config, llama_cfg, 0)))
    return config, spec, state, batch


def loss_and_grads(updates: dict):
    """(loss, gradients in the unscanned layout as float64 numpy)."""
    config, spec, state, batch = setup(updates)
    grad_fn = jax.jit(jax.value_and_grad(
        lambda p: _loss_and_metrics(spec, p, batch)[0]))
    loss, grads = grad_fn(state.params)
    grads = {**grads, "decoder": unstack_layers(grads["decoder"])}
    return float(loss), jax.tree.map(lambda g: np.asarray(g, np.float64), jax.device_get(grads))


def relative_l2(got, want) -> float:
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


@pytest.fixture(scope="module")
def fp32_reference():
    return loss_and_grads({})


@pytest.mark.slow
def test_bf16_scan_remat_gradients_match_fp32_unscanned(fp32_reference):
    want_loss, want = fp32_reference
    got_loss, got = loss_and_grads(ACCELERATOR)
    assert got_loss == pytest.approx(want_loss, rel=BF16_LOSS_RTOL)
    paths = jax.tree_util.tree_leaves_with_path(want)
    assert len(paths) == 5 * 9 + 4  # 9 tensors per layer; embedding, final norm, projection, logit scale
    for (path, w), g in zip(paths, jax.tree.leaves(got), strict=True):
        assert relative_l2(g, w) <= BF16_GRAD_REL_L2, (jax.tree_util.keystr(path), relative_l2(g, w))


@pytest.mark.slow
def test_bf16_scan_remat_train_step_runs_compiles_once_and_keeps_dtypes(fp32_reference):
    """Three calls of the jitted train step: finite metrics, the first step's loss equal to the fp32
    reference's, one compiled program (no retrace from a changed dtype, sharding or weak type), and the
    state keeps the abstract state's dtypes (fp32 parameters and moments under bf16 compute)."""
    config, spec, state, batch = setup(ACCELERATOR)
    step_fn, _ = compile_steps(spec)
    losses = []
    for _ in range(3):
        state, metrics = step_fn(state, batch)
        losses.append(float(metrics["loss"]))
    assert step_fn._cache_size() == 1
    assert np.all(np.isfinite(losses)) and losses[2] < losses[0]  # same batch: the step descends
    assert losses[0] == pytest.approx(fp32_reference[0], rel=BF16_LOSS_RTOL)
    for live, want in zip(jax.tree.leaves(state), jax.tree.leaves(spec.abstract_state), strict=True):
        assert live.dtype == want.dtype
    layer_kernel = state.params["decoder"]["layers"]["layer"]["attn"]["q_proj"]["kernel"]
    assert layer_kernel.dtype == np.float32 and layer_kernel.shape[0] == 5  # stacked for the scan


@pytest.mark.slow
def test_gradients_equal_across_remat_policies(fp32_reference):
    """Rematerialisation recomputes the same float32 operations: every policy gives the scanned,
    un-rematerialised gradients to the original bound; and scanning gives the unscanned ones up to
    summation order."""
    want_loss, unscanned = fp32_reference
    scanned_loss, scanned = loss_and_grads({"model.scan_layers": True, "model.remat_policy": "none"})
    assert scanned_loss == pytest.approx(want_loss, rel=1e-6)
    for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(unscanned), jax.tree.leaves(scanned), strict=True):
        # atol relative to the tensor's scale: unscanned, the last layer runs at the read rows only
        # (read_positions); scanned, the rows are gathered after, so sums differ in order (measured on the
        # Intel Xeon VM: 11 of 32,768 embedding-gradient entries off by up to 2.4e-6 at scale ~0.5).
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=max(1e-7, 1e-5 * float(np.max(np.abs(w)))),
                                   err_msg=f"scanned {jax.tree_util.keystr(path)}")
    for policy in ("full", "dots_saveable", "dots_with_no_batch_dims_saveable"):
        loss, got = loss_and_grads({"model.scan_layers": True, "model.remat_policy": policy})
        assert loss == pytest.approx(want_loss, rel=1e-6), policy
        for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(scanned), jax.tree.leaves(got), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7, err_msg=f"{policy} {jax.tree_util.keystr(path)}")
