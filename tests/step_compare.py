"""One training step from the trainer's own pieces, and the comparisons the step-equality tests make of two
variants of it (GradCache, the packed LM head, the w/o CSFT step without the head)."""
from __future__ import annotations

import jax
import numpy as np

from notellm_jax.train.step import loss_and_grads, train_step


def one_step(spec, state, batch) -> tuple[dict, dict, dict]:
    """(metrics, gradients, parameter update after one optimiser step) on `batch`; one compilation."""

    @jax.jit
    def grads_and_step(state, batch):
        metrics, grads = loss_and_grads(state, batch, setup=spec)
        return metrics, grads, train_step(state, batch, setup=spec)[0].params

    before = jax.device_get(state.params)
    metrics, grads, after = jax.device_get(grads_and_step(state, batch))
    update = jax.tree.map(lambda new, old: np.asarray(new, np.float64) - old, after, before)
    return metrics, grads, update


def assert_same_metrics(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)


def assert_same_grads(got, want, every_tensor_trained: bool = True) -> None:
    """Every gradient equal to float tolerance; with `every_tensor_trained`, each reference tensor also has a
    non-zero gradient (so the comparison is not vacuous)."""
    flat_got = jax.tree_util.tree_leaves_with_path(got)
    flat_want = jax.tree_util.tree_leaves_with_path(want)
    assert [p for p, _ in flat_got] == [p for p, _ in flat_want]
    for (path, g), (_, w) in zip(flat_got, flat_want):
        scale = float(np.max(np.abs(w)))
        if every_tensor_trained:
            assert scale > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-5 * max(scale, 1e-30), err_msg=jax.tree_util.keystr(path))


def relative_l2(got, want) -> float:
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def assert_same_updates(got, want) -> None:
    """Adam's first step is about lr * sign(g): elements whose gradient is rounding noise may flip, so each
    update is compared by its relative L2 error (a wrong gradient gives errors of order 1)."""
    for (path, g), (_, w) in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves_with_path(want)):
        assert relative_l2(g, w) < 2e-3, (jax.tree_util.keystr(path), relative_l2(g, w))


def sparse_targets(local: dict, seed: int, most: int = 3) -> dict:
    """A host batch with 1..`most` supervised slots per note (real batches fill ~20% of them)."""
    rng = np.random.default_rng(seed)
    n, m = local["target_mask"].shape
    counts = rng.integers(1, most + 1, size=n)
    return {**local, "target_mask": (np.arange(m)[None, :] < counts[:, None]).astype(np.float32)}
