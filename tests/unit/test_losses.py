"""NoteLLM's losses and heads against an independent float64 numpy version of METHOD.md sections 1-3.

The numpy reference is written from the formulas, not from the JAX code: positives come from the
[a_1..a_B, b_1..b_B] layout (row i <-> row i +- B), the denominator sums over j != i explicitly, the
generation loss is a masked token mean of -log softmax. Gradients are checked against central finite
differences of that numpy reference.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy_params import numpy_params

from notellm_jax.model.families import preset
from notellm_jax.model.llama import Llama
from notellm_jax.model.notellm import (OBJECTIVES, NoteLLM, check_pairs, combine_losses, contrastive_loss,
                                       generation_loss, notellm_losses)

# --------------------------------------------------------------------------------------------------
# numpy reference (float64)


def np_cosine(x: np.ndarray) -> np.ndarray:
    unit = x / np.linalg.norm(x, axis=-1, keepdims=True)
    return unit @ unit.T


def np_layout_positive(n: int) -> np.ndarray:
    """Index of each row's positive in the [a_1..a_B, b_1..b_B] layout."""
    b = n // 2
    return np.concatenate([np.arange(b) + b, np.arange(b)])


def np_contrastive(x: np.ndarray, tau: float) -> tuple[float, float]:
    """L_cl = -(1/2B) sum_i log(exp(sim(i, i+) e^tau) / sum_{j != i} exp(sim(i, j) e^tau)), and top-1 accuracy."""
    n = x.shape[0]
    sim = np_cosine(np.asarray(x, np.float64)) * np.exp(tau)
    pos = np_layout_positive(n)
    total, hits = 0.0, 0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        denominator = np.sum(np.exp(sim[i, others]))
        total += -np.log(np.exp(sim[i, pos[i]]) / denominator)
        hits += others[int(np.argmax(sim[i, others]))] == pos[i]
    return total / n, hits / n


def np_generation(logits: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> float:
    """Mean over supervised tokens of -log softmax(logits)[target]."""
    logits = np.asarray(logits, np.float64)
    nll, count = 0.0, 0.0
    for idx in np.ndindex(*targets.shape):
        if mask[idx]:
            row = logits[idx]
            nll += np.log(np.sum(np.exp(row - row.max()))) + row.max() - row[targets[idx]]
            count += 1
    return nll / count


def np_combined(l_cl: float, l_gen: float, alpha: float, objective: str) -> float:
    return {"notellm": (l_cl + alpha * l_gen) / (1 + alpha), "gcl_only": l_cl, "csft_only": l_gen}[objective]


def central_difference(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    grad = np.zeros_like(x, dtype=np.float64)
    for idx in np.ndindex(*x.shape):
        up, down = x.astype(np.float64).copy(), x.astype(np.float64).copy()
        up[idx] += eps
        down[idx] -= eps
        grad[idx] = (f(up) - f(down)) / (2 * eps)
    return grad


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def layout_pair_ids(b: int) -> np.ndarray:
    return np.concatenate([np.arange(b), np.arange(b)]).astype(np.int32)


contrastive = jax.jit(contrastive_loss)  # one compilation per shape instead of op-by-op dispatch


def jax_l2_normalise(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


# --------------------------------------------------------------------------------------------------
# L_cl


@pytest.mark.parametrize("b,d,tau", [(1, 4, 3.0), (2, 8, 0.0), (5, 16, 3.0), (8, 32, 1.5), (16, 8, -1.0)])
def test_contrastive_value_and_accuracy_match_numpy(b, d, tau):
    rng = np.random.default_rng(b * 100 + d)
    x = unit_rows(rng, 2 * b, d)
    # Make about half the positives the nearest neighbour so the accuracy is neither 0 nor 1 by accident.
    x[b:b + b // 2] = x[:b // 2] + 0.3 * x[b:b + b // 2]
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    loss, accuracy = contrastive(jnp.asarray(x), jnp.asarray(layout_pair_ids(b)), jnp.float32(tau))
    want_loss, want_accuracy = np_contrastive(x, tau)
    np.testing.assert_allclose(float(loss), want_loss, rtol=2e-6, atol=2e-6)
    assert float(accuracy) == pytest.approx(want_accuracy, abs=1e-7)


@pytest.mark.parametrize("b,d,tau", [(2, 4, 3.0), (4, 6, 0.5), (6, 3, -0.7)])
def test_contrastive_gradients_match_finite_differences(b, d, tau):
    """d L_cl / d (raw embedding) through the L2 norm, and d L_cl / d tau, vs numpy central differences."""
    rng = np.random.default_rng(7 + b)
    raw = rng.normal(size=(2 * b, d))
    pair_ids = jnp.asarray(layout_pair_ids(b))

    def jax_loss(x, t):
        return contrastive_loss(jax_l2_normalise(x), pair_ids, t)[0]

    grad_x, grad_tau = jax.jit(jax.grad(jax_loss, argnums=(0, 1)))(jnp.asarray(raw, jnp.float32), jnp.float32(tau))
    want_x = central_difference(lambda x: np_contrastive(x, tau)[0], raw)
    want_tau = central_difference(lambda t: np_contrastive(raw, float(t[0]))[0], np.array([tau]))[0]
    scale = np.abs(want_x).max()
    np.testing.assert_allclose(np.asarray(grad_x), want_x, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(float(grad_tau), want_tau, rtol=1e-4, atol=1e-6)
    assert scale > 1e-2  # the check is not vacuous


def test_pair_id_positives_equal_layout_positives_under_any_row_order_and_labels():
    """Rows in any order with arbitrary pair labels: the same loss as the [a..., b...] layout."""
    b, d, tau = 6, 8, 2.0
    rng = np.random.default_rng(3)
    x = unit_rows(rng, 2 * b, d)
    want_loss, want_accuracy = np_contrastive(x, tau)
    labels = rng.choice(10_000, size=b, replace=False).astype(np.int32)
    order = rng.permutation(2 * b)
    pair_ids = np.concatenate([labels, labels])[order]
    loss, accuracy = contrastive(jnp.asarray(x[order]), jnp.asarray(pair_ids), jnp.float32(tau))
    np.testing.assert_allclose(float(loss), want_loss, rtol=2e-6)
    assert float(accuracy) == pytest.approx(want_accuracy, abs=1e-7)
    # Wrong pairing (every a_i matched to b_{i+1}) must change the loss: the labels are really used.
    shifted = np.concatenate([np.arange(b), np.roll(np.arange(b), 1)]).astype(np.int32)
    wrong, _ = contrastive(jnp.asarray(x), jnp.asarray(shifted), jnp.float32(tau))
    assert abs(float(wrong) - want_loss) > 1e-2


def test_contrastive_perfect_pairs_reach_full_accuracy_and_low_loss():
    b, d = 4, 8
    a = np.eye(d, dtype=np.float32)[:b]  # orthogonal notes, each pair identical
    loss, accuracy = contrastive(jnp.asarray(np.concatenate([a, a])), jnp.asarray(layout_pair_ids(b)),
                                 jnp.float32(3.0))
    want_loss, _ = np_contrastive(np.concatenate([a, a]), 3.0)
    assert float(accuracy) == 1.0
    np.testing.assert_allclose(float(loss), want_loss, atol=1e-6)  # e^-20-sized terms: float32 rounds to 0
    assert want_loss < 1e-6


# --------------------------------------------------------------------------------------------------
# Duplicate-aware L_cl: repeated notes and reversed pairs in one batch


def np_contrastive_dedup(x: np.ndarray, pair_id: np.ndarray, note_id: np.ndarray, tau: float) -> float:
    """L_cl where row i's negatives exclude every row holding row i's note or its positive's note."""
    n = x.shape[0]
    sim = np_cosine(np.asarray(x, np.float64)) * np.exp(tau)
    total = 0.0
    for i in range(n):
        (p,) = [j for j in range(n) if j != i and pair_id[j] == pair_id[i]]
        negatives = [j for j in range(n) if j not in (i, p) and note_id[j] not in (note_id[i], note_id[p])]
        denominator = np.exp(sim[i, p]) + np.sum(np.exp(sim[i, negatives]))
        total += -np.log(np.exp(sim[i, p]) / denominator)
    return total / n


# Pairs (as note ids) with a note repeated across pairs and reversed pairs (A,B)+(B,A); layout [a..., b...].
DUPLICATE_BATCHES = {
    "repeated_note": [(0, 1), (0, 2), (3, 4), (5, 0)],
    "reversed_pair": [(0, 1), (1, 0), (2, 3), (4, 5)],
    "both": [(0, 1), (1, 0), (1, 2), (3, 4), (5, 6), (6, 5)],
}


def duplicate_batch(pairs, d: int, seed: int):
    """Embeddings where repeated notes get the same vector (as the model would give them)."""
    rng = np.random.default_rng(seed)
    notes = np.array([a for a, _ in pairs] + [b for _, b in pairs], np.int32)
    table = rng.normal(size=(notes.max() + 1, d))
    return table[notes], layout_pair_ids(len(pairs)), notes


@pytest.mark.parametrize("name", sorted(DUPLICATE_BATCHES))
@pytest.mark.parametrize("tau", [3.0, 0.4])
def test_duplicate_aware_contrastive_value_and_gradients_match_numpy(name, tau):
    raw, pair_ids, notes = duplicate_batch(DUPLICATE_BATCHES[name], 6, seed=len(name))
    raw = raw + 0.01 * np.random.default_rng(1).normal(size=raw.shape)  # distinct rows: FD sees every row

    def jax_loss(x, t):
        return contrastive_loss(jax_l2_normalise(x), jnp.asarray(pair_ids), t, jnp.asarray(notes))[0]

    loss, (grad_x, grad_tau) = jax.jit(jax.value_and_grad(jax_loss, argnums=(0, 1)))(
        jnp.asarray(raw, jnp.float32), jnp.float32(tau))
    np.testing.assert_allclose(float(loss), np_contrastive_dedup(raw, pair_ids, notes, tau), rtol=2e-6)
    want_x = central_difference(lambda x: np_contrastive_dedup(x, pair_ids, notes, tau), raw)
    want_tau = central_difference(lambda t: np_contrastive_dedup(raw, pair_ids, notes, float(t[0])),
                                  np.array([tau]))[0]
    scale = np.abs(want_x).max()
    np.testing.assert_allclose(np.asarray(grad_x), want_x, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(float(grad_tau), want_tau, rtol=1e-4, atol=1e-6)
    # The mask matters on these batches: the plain loss (duplicates as negatives) is different.
    assert abs(np_contrastive(raw, tau)[0] - float(loss)) > 1e-2


def test_duplicate_aware_loss_equals_plain_loss_when_every_note_is_distinct():
    raw, pair_ids, _ = duplicate_batch([(0, 1), (2, 3), (4, 5)], 8, seed=4)
    x = jnp.asarray(raw / np.linalg.norm(raw, axis=-1, keepdims=True), jnp.float32)
    with_ids = contrastive(x, jnp.asarray(pair_ids), jnp.float32(2.0), jnp.arange(6, dtype=jnp.int32))
    np.testing.assert_allclose([float(v) for v in with_ids], np_contrastive(raw, 2.0), rtol=2e-6)


def test_reversed_pair_copy_is_no_negative_so_perfect_pairs_reach_full_accuracy():
    """(A,B)+(B,A): without the mask, B's second copy ties with the positive and caps the accuracy."""
    pairs = [(0, 1), (1, 0), (2, 3)]
    raw, pair_ids, notes = duplicate_batch(pairs, 8, seed=0)
    table = np.eye(8)[[0, 0, 1, 1]]  # notes 0,1 identical pair vectors; notes 2,3 identical too
    x = jnp.asarray(table[notes], jnp.float32)
    loss, accuracy = contrastive(x, jnp.asarray(pair_ids), jnp.float32(3.0), jnp.asarray(notes))
    assert float(accuracy) == 1.0
    np.testing.assert_allclose(float(loss), np_contrastive_dedup(table[notes], pair_ids, notes, 3.0), atol=1e-6)


@pytest.mark.parametrize("pair_ids", [[0, 1, 0, 2], [0, 0, 0, 1, 1, 1], [3, 4, 3, 5]])
def test_pair_ids_that_do_not_occur_exactly_twice_are_an_error(pair_ids):
    with pytest.raises(ValueError, match="exactly twice"):
        check_pairs(np.asarray(pair_ids))
    check_pairs(np.asarray([5, 7, 5, 7]), np.asarray([1, 2, 3, 4]))  # a valid batch passes


def test_row_without_partner_gets_nan_not_a_zero_positive_logit():
    """If the host check were bypassed, the device loss must not quietly train on a missing positive."""
    x = jnp.asarray(unit_rows(np.random.default_rng(0), 4, 4))
    loss, _ = contrastive(x, jnp.asarray([0, 1, 0, 2], jnp.int32), jnp.float32(1.0), jnp.arange(4, dtype=jnp.int32))
    assert np.isnan(float(loss))


# --------------------------------------------------------------------------------------------------
# L_gen and L


def _gen_inputs(rng: np.random.Generator, n: int, m: int, v: int):
    logits = (3.0 * rng.normal(size=(n, m, v))).astype(np.float32)
    targets = rng.integers(0, v, size=(n, m)).astype(np.int32)
    mask = (rng.random((n, m)) < 0.6).astype(np.float32)
    mask[0] = 0.0  # a row with no supervised token
    mask[1, 0] = 1.0
    return logits, targets, mask


@pytest.mark.parametrize("n,m,v", [(2, 1, 5), (4, 3, 17), (5, 4, 23)])
def test_generation_loss_value_and_gradient_match_numpy(n, m, v):
    logits, targets, mask = _gen_inputs(np.random.default_rng(n * m), n, m, v)
    loss, grad = jax.jit(jax.value_and_grad(generation_loss))(jnp.asarray(logits), jnp.asarray(targets),
                                                              jnp.asarray(mask))
    np.testing.assert_allclose(float(loss), np_generation(logits, targets, mask), rtol=2e-6)
    want = central_difference(lambda z: np_generation(z, targets, mask), logits)
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(grad)[mask == 0] == 0.0)  # unsupervised positions get no gradient


def test_generation_loss_ignores_masked_token_values():
    logits, targets, mask = _gen_inputs(np.random.default_rng(1), 3, 4, 9)
    changed = logits.copy()
    changed[mask == 0] = 100.0 * np.random.default_rng(2).normal(size=changed[mask == 0].shape)
    args = (jnp.asarray(targets), jnp.asarray(mask))
    loss = jax.jit(generation_loss)
    assert float(loss(jnp.asarray(changed), *args)) == float(loss(jnp.asarray(logits), *args))


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("alpha", [0.01, 0.1, 1.0])
def test_combine_losses(objective, alpha):
    l_cl, l_gen = 2.7, 5.3
    got = float(combine_losses(jnp.float32(l_cl), jnp.float32(l_gen), alpha, objective))
    np.testing.assert_allclose(got, np_combined(l_cl, l_gen, alpha, objective), rtol=1e-6)


def test_combine_losses_rejects_unknown_objective():
    with pytest.raises(ValueError, match="unknown objective 'both'"):
        combine_losses(jnp.float32(1.0), jnp.float32(1.0), 0.01, "both")


@pytest.mark.parametrize("objective,alpha,tau", [("notellm", 0.01, 3.0), ("notellm", 0.5, 1.0),
                                                  ("gcl_only", 0.01, 3.0), ("csft_only", 0.01, 2.0)])
def test_notellm_losses_values_and_gradients(objective, alpha, tau):
    """The combined loss from model-shaped outputs, and its gradient w.r.t. the embeddings and tau."""
    b, d, m, v = 4, 6, 3, 11
    rng = np.random.default_rng(11)
    raw = rng.normal(size=(2 * b, d))
    logits, targets, mask = _gen_inputs(rng, 2 * b, m, v)
    batch = {"pair_id": jnp.asarray(layout_pair_ids(b)), "target_ids": jnp.asarray(targets),
             "target_mask": jnp.asarray(mask)}

    def total(x, t):
        outputs = {"embedding": jax_l2_normalise(x), "log_logit_scale": t, "gen_logits": jnp.asarray(logits)}
        metrics = notellm_losses(outputs, batch, alpha, objective)
        return metrics["loss"], metrics

    (loss, metrics), (grad_x, grad_tau) = jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True))(
        jnp.asarray(raw, jnp.float32), jnp.float32(tau))
    l_gen = np_generation(logits, targets, mask)

    def np_total(x, t):
        return np_combined(np_contrastive(x, t)[0], l_gen, alpha, objective)

    l_cl, accuracy = np_contrastive(raw, tau)
    np.testing.assert_allclose(float(loss), np_total(raw, tau), rtol=2e-6)
    np.testing.assert_allclose(float(metrics["loss_cl"]), l_cl, rtol=2e-6)
    np.testing.assert_allclose(float(metrics["loss_gen"]), l_gen, rtol=2e-6)
    assert float(metrics["accuracy"]) == pytest.approx(accuracy, abs=1e-7)
    assert float(metrics["log_logit_scale"]) == pytest.approx(tau)
    want_x = central_difference(lambda x: np_total(x, tau), raw)
    want_tau = central_difference(lambda t: np_total(raw, float(t[0])), np.array([tau]))[0]
    np.testing.assert_allclose(np.asarray(grad_x), want_x, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(grad_tau), want_tau, rtol=1e-4, atol=1e-7)
    if objective == "csft_only":
        assert np.all(want_x == 0.0) and float(grad_tau) == 0.0


# --------------------------------------------------------------------------------------------------
# The NoteLLM module: embedding and generation heads on top of the decoder


@pytest.fixture(scope="module")
def tiny_notellm():
    """A random GQA LLaMA (untied head) with NoteLLM heads; rows: full, right-padded, left-padded."""
    cfg = preset("tiny", vocab_size=97, num_hidden_layers=2)
    model = NoteLLM(cfg, emb_dim=12, log_logit_scale_init=3.0)
    rng = np.random.default_rng(0)
    n, t, m = 3, 10, 4
    ids = rng.integers(3, cfg.vocab_size, size=(n, t)).astype(np.int32)
    mask = np.ones((n, t), np.int32)
    mask[1, 7:] = 0   # right padding
    mask[2, :3] = 0   # left padding
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
             "embed_read_pos": jnp.asarray([9, 5, 6], jnp.int32),
             "target_positions": jnp.asarray(rng.integers(0, t, size=(n, m)).astype(np.int32))}
    params = numpy_params(lambda key: model.init(key, batch)["params"], jax.random.key(1), scalar=3.0)
    outputs = jax.jit(model.apply)({"params": params}, batch)
    return cfg, model, params, batch, outputs


def test_embedding_is_normalised_projection_of_hidden_state_at_emb_index(tiny_notellm):
    cfg, _, params, batch, outputs = tiny_notellm
    hidden = jax.jit(Llama(cfg).apply)({"params": params["decoder"]}, batch["input_ids"], batch["attention_mask"])
    hidden = np.asarray(hidden, np.float64)
    rows = hidden[np.arange(hidden.shape[0]), np.asarray(batch["embed_read_pos"])]
    z = rows @ np.asarray(params["proj"]["kernel"], np.float64)
    want = z / np.linalg.norm(z, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(outputs["embedding"]), want, rtol=1e-5, atol=1e-6)
    assert outputs["embedding"].shape == (3, 12)
    assert float(outputs["log_logit_scale"]) == 3.0


def test_gen_logits_equal_full_logits_gathered_at_target_positions(tiny_notellm):
    cfg, model, params, batch, outputs = tiny_notellm
    decoder = Llama(cfg)

    @jax.jit
    def full_logits(decoder_params):
        hidden = decoder.apply({"params": decoder_params}, batch["input_ids"], batch["attention_mask"])
        return decoder.apply({"params": decoder_params}, hidden, method=Llama.logits)  # [N, T, V]

    full = np.asarray(full_logits(params["decoder"]))
    positions = np.asarray(batch["target_positions"])
    want = np.stack([full[i, positions[i]] for i in range(full.shape[0])])
    np.testing.assert_allclose(np.asarray(outputs["gen_logits"]), want, rtol=1e-5, atol=1e-5)
    without = jax.eval_shape(lambda p: model.apply({"params": p}, batch, with_logits=False), params)
    assert "gen_logits" not in without


def test_hidden_in_from_frozen_bottom_gives_the_same_outputs(tiny_notellm):
    """The frozen-layer path: the bottom layer's features fed back in as hidden_in equal the full forward."""
    _, model, params, batch, outputs = tiny_notellm

    @jax.jit
    def top_from_bottom(p):
        # Only the frozen part (embedding + layer 0) is given: FeatureCache holds nothing else.
        frozen = {"decoder": {k: p["decoder"][k] for k in ("embed_tokens", "layers_0")}}
        features = model.apply({"params": frozen}, batch["input_ids"], batch["attention_mask"], 1,
                               method=NoteLLM.bottom)
        top_batch = {k: v for k, v in batch.items() if k != "input_ids"} | {"hidden_in": features}
        return model.apply({"params": p}, top_batch, first_layer=1)

    top = top_from_bottom(params)
    for key in ("embedding", "gen_logits"):
        np.testing.assert_allclose(np.asarray(top[key]), np.asarray(outputs[key]), rtol=1e-5, atol=1e-6)
