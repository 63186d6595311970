"""GradCache-style two-pass step (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup"; Tevatron's GradCache): the number of in-batch negatives is not bounded by activation memory.

Naive micro-batch accumulation would shrink the pool of negatives (STYLE.md). Instead:
  1. embed the whole global batch chunk by chunk without keeping activations (a forward-only scan);
  2. the contrastive loss on all 2B embeddings at once: its gradient w.r.t. the embeddings (and the logit scale);
  3. re-run each chunk with activations and pull those embedding gradients back through it (a VJP taken
     as the gradient of <embedding, d L/d embedding>), adding the chunk's share of the generation loss'
     gradient, and accumulate the parameter gradients over chunks.
The result equals the full-batch gradient up to float summation order (tests/unit/test_grad_cache.py).
Chunks are strided (chunk j = rows j, j + k, j + 2k, ...), so every device's contiguous rows hold an equal
share of each chunk and a chunk stays spread over the whole mesh.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from notellm_jax.model.notellm import combine_losses, contrastive_loss, generation_loss, needs_logits


def _to_chunks(tree: dict, chunks: int) -> dict:
    """[N, ...] -> [chunks, N / chunks, ...] with chunk j = rows j, j + chunks, ..."""
    return jax.tree.map(lambda v: jnp.swapaxes(v.reshape(v.shape[0] // chunks, chunks, *v.shape[1:]), 0, 1), tree)


def _from_chunks(array: jax.Array) -> jax.Array:
    return jnp.swapaxes(array, 0, 1).reshape(-1, *array.shape[2:])


def loss_weights(alpha: float, objective: str) -> tuple[float, float]:
    """d L / d L_cl and d L / d L_gen of the (linear) combined loss, from `combine_losses` itself."""
    with jax.ensure_compile_time_eval():  # called while tracing the step: evaluate now, not in the graph
        w_cl, w_gen = jax.grad(combine_losses, argnums=(0, 1))(1.0, 1.0, alpha, objective)
    return float(w_cl), float(w_gen)


def grad_cache_loss_and_grads(apply: Callable[[Any, dict, bool], dict], params: Any, batch: dict, *,
                              chunk_rows: int, alpha: float, objective: str) -> tuple[dict, Any]:
    """(metrics, gradients w.r.t. `params`) of the NoteLLM loss on `batch`, computed in chunks.

    apply(params, rows, with_logits) -> model outputs for those rows; `params["log_logit_scale"]` is the temperature.
    """
    n = batch["attention_mask"].shape[0]
    if chunk_rows <= 0 or n % chunk_rows:
        raise ValueError(f"train.grad_cache_chunk={chunk_rows} must divide the {n} notes of the global batch")
    count = n // chunk_rows
    chunked = _to_chunks(batch, count)

    def embed(_, rows):
        return None, apply(params, rows, False)["embedding"]

    _, embedding = jax.lax.scan(embed, None, chunked)  # pass 1: no residuals are kept for a backward pass
    embedding = _from_chunks(jax.lax.stop_gradient(embedding))
    scale = params["log_logit_scale"]
    (l_cl, accuracy), (d_embedding, d_scale) = jax.value_and_grad(contrastive_loss, argnums=(0, 2), has_aux=True)(
        embedding, batch["pair_id"], scale, batch.get("note_index"))
    w_cl, w_gen = loss_weights(alpha, objective)
    supervised = jnp.maximum(jnp.sum(batch["target_mask"].astype(jnp.float32)), 1.0)

    with_logits = needs_logits(objective)  # "gcl_only" skips the head, as the full-batch step does

    def backward(total, inputs):
        rows, d_rows = inputs

        def surrogate(p):
            out = apply(p, rows, with_logits)
            if not with_logits:
                return w_cl * jnp.sum(out["embedding"] * d_rows), jnp.float32(0.0)
            tokens = jnp.maximum(jnp.sum(rows["target_mask"].astype(jnp.float32)), 1.0)
            # This chunk's share of the batch-wide token mean (generation_loss is the chunk's own mean).
            chunk_mean = generation_loss(out["gen_logits"], rows["target_ids"], rows["target_mask"])
            gen_share = chunk_mean * tokens / supervised
            return w_cl * jnp.sum(out["embedding"] * d_rows) + w_gen * gen_share, gen_share

        grads, gen_share = jax.grad(surrogate, has_aux=True)(params)
        return jax.tree.map(jnp.add, total, grads), gen_share

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, gen_shares = jax.lax.scan(backward, zeros, (chunked, _to_chunks(d_embedding, count)))
    grads = {**grads, "log_logit_scale": grads["log_logit_scale"] + w_cl * d_scale}
    l_gen = jnp.sum(gen_shares) if with_logits else None
    metrics = {"loss": combine_losses(l_cl, l_gen, alpha, objective), "loss_cl": l_cl, "accuracy": accuracy,
               "log_logit_scale": scale}
    if with_logits:
        metrics["loss_gen"] = l_gen
    return metrics, grads
