"""NoteLLM: the LLaMA decoder plus the [EMB] projection, the learnable temperature and both losses.

One forward pass over a batch of prompts gives
  * the note embedding: the final hidden state (after the last norm) at the token just before [EMB],
    projected without bias to `emb_dim` and L2-normalised (METHOD.md 1); or, with `pooling`, the mean or a
    learned attention pooling of the hidden states up to that token (issue 28's levers, docs/model.md);
  * the generation logits, but only at the supervised positions (`target_positions`), so no
    [batch, length, vocab] float32 tensor is ever built.
The losses (METHOD.md 2-3) are computed on the global, sharded arrays: the contrastive similarity is
`z @ z.T` over all 2B notes of the global batch, so gradients reach every negative (as in SigLIP/big_vision).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from notellm_jax.model.families import LlamaConfig
from notellm_jax.model.llama import Llama, take_rows

OBJECTIVES = ("notellm", "gcl_only", "csft_only")
POOLINGS = ("emb", "mean", "attention")  # model.pooling


class NoteLLM(nn.Module):
    llama: LlamaConfig
    emb_dim: int = 128
    log_logit_scale_init: float = 3.0
    # model.prefix_bidirectional: decoder layers from this one on (the trained ones) let the prompt up to
    # [EMB]'s read position attend in both directions; -1 = causal everywhere (the paper).
    bidirectional_from: int = -1
    # model.pooling: "emb" (the paper's [EMB] read-out), "mean" or "attention" over `note_token_mask`.
    pooling: str = "emb"

    def setup(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling {self.pooling!r} not in {POOLINGS}")
        self.decoder = Llama(self.llama)
        if self.pooling == "attention":
            self.pooler = AttentionPool(self.llama.precision.param, name="pooler")
        # The [EMB] projection runs in the policy's output dtype (float32): it feeds the similarity logits.
        self.proj = nn.Dense(self.emb_dim, use_bias=False, dtype=self.llama.precision.output,
                             param_dtype=self.llama.precision.param,
                             kernel_init=nn.with_logical_partitioning(
                                 nn.initializers.normal(stddev=self.llama.hidden_size ** -0.5),
                                 ("embed", "emb_proj")))

    @nn.compact  # tau is declared here, not in setup, so `bottom` runs on the frozen decoder params alone
    def __call__(self, batch: dict[str, jax.Array], *, first_layer: int = 0, last_layer: int | None = None,
                 with_logits: bool = True) -> dict[str, jax.Array]:
        """batch: input_ids [N, T] (or hidden_in [N, T, H] = output of frozen layers [0, first_layer)),
        attention_mask [N, T], embed_read_pos [N], and for generation target_positions [N, M]; with
        head_index [C] (`pack_head_rows`) the LM head runs at those C of the N x M supervised slots alone."""
        # Only these rows of the final hidden states are read: [EMB]'s read position, then the supervised
        # ones; the last layer computes nothing else (Llama.__call__ read_positions).
        read = batch["embed_read_pos"][:, None].astype(jnp.int32)
        if with_logits:
            read = jnp.concatenate([read, batch["target_positions"].astype(jnp.int32)], axis=1)  # [N, 1 + M]
        pooled = self.pooling != "emb"
        hidden = self._decode(batch, first_layer, last_layer, None if pooled else read)
        if pooled:  # a pooling reads every row up to [EMB]'s: the last layer ran in full
            rows = self._pool(hidden, batch["attention_mask"], batch["embed_read_pos"])
            hidden = take_rows(hidden, read)
        else:
            rows = hidden[:, 0]
        tau = self.param("log_logit_scale", nn.with_logical_partitioning(nn.initializers.constant(self.log_logit_scale_init), ()),
                         (), jnp.float32)
        out = {"embedding": self.embed_rows(rows), "log_logit_scale": tau}
        if with_logits:
            supervised = hidden[:, 1:]
            if "head_index" in batch:  # packed: [N x M, H] -> the C rows that hold a target
                supervised = jnp.take(supervised.reshape(-1, supervised.shape[-1]), batch["head_index"], axis=0)
            # [N, M, V] or [C, V], float32 (the policy's output dtype)
            out["gen_logits"] = self.decoder.logits(supervised)
        return out

    def _decode(self, batch: dict[str, jax.Array], first_layer: int, last_layer: int | None,
                read: jax.Array | None) -> jax.Array:
        """The decoder's final hidden states (at `read` [N, P] only, when given), with the bidirectional
        prefix [0, embed_read_pos] in layers from `bidirectional_from` on."""
        prefix_end = None
        if self.bidirectional_from >= 0:
            prefix_end = batch["embed_read_pos"].astype(jnp.int32) + 1
        inputs = ({"inputs_embeds": batch["hidden_in"]} if "hidden_in" in batch
                  else {"input_ids": batch["input_ids"]})
        return self.decoder(attention_mask=batch["attention_mask"], first_layer=first_layer, last_layer=last_layer,
                            read_positions=read, prefix_end=prefix_end,
                            prefix_from_layer=max(self.bidirectional_from, 0), **inputs)

    def _pool(self, hidden: jax.Array, attention_mask: jax.Array, embed_read_pos: jax.Array) -> jax.Array:
        """[N, T, H] final hidden states -> [N, H] pooled over `note_token_mask` ("mean" or "attention")."""
        mask = note_token_mask(attention_mask, embed_read_pos)
        hidden = hidden.astype(self.llama.precision.output)
        if self.pooling == "mean":
            return mean_pool(hidden, mask)
        return self.pooler(hidden, mask)

    def embed_hidden(self, hidden: jax.Array, embed_read_pos: jax.Array) -> jax.Array:
        """[N, T, H] final hidden states -> [N, emb_dim] unit vectors taken at `embed_read_pos`."""
        return self.embed_rows(take_rows(hidden, embed_read_pos[:, None].astype(jnp.int32))[:, 0])

    def embed_rows(self, h: jax.Array) -> jax.Array:
        """[N, H] final hidden states at the read position -> [N, emb_dim] unit vectors."""
        z = self.proj(h.astype(self.llama.precision.output))
        return z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, axis=-1, keepdims=True), 1e-12))

    def bottom(self, input_ids: jax.Array, attention_mask: jax.Array, num_layers: int) -> jax.Array:
        """Hidden states after the first `num_layers` decoder layers (no final norm): frozen-layer features."""
        return self.decoder(input_ids, attention_mask, last_layer=num_layers, final_norm=False)


def note_token_mask(attention_mask: jax.Array, embed_read_pos: jax.Array) -> jax.Array:
    """[N, T] bool: the tokens a pooling reads, the real tokens in slots [0, embed_read_pos]: the instruction,
    the note and the compression phrase, which is everything the [EMB] read-out sees and nothing after it,
    so the generated output never reaches the embedding."""
    slots = jnp.arange(attention_mask.shape[1])[None, :]
    return (attention_mask > 0) & (slots <= embed_read_pos[:, None].astype(jnp.int32))


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """[N, T, H], [N, T] bool -> [N, H]: the mean of the masked rows."""
    weights = mask.astype(hidden.dtype)
    return jnp.einsum("nt,nth->nh", weights, hidden) / jnp.maximum(weights.sum(-1, keepdims=True), 1.0)


class AttentionPool(nn.Module):
    """A learned query q [H] (initialised at zero, so training starts from the mean): softmax over the masked
    rows of h_t . q / sqrt(H), then the weighted mean of h_t."""
    param_dtype: Any

    @nn.compact
    def __call__(self, hidden: jax.Array, mask: jax.Array) -> jax.Array:
        query = self.param("query", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                           (hidden.shape[-1],), self.param_dtype)
        scores = jnp.einsum("nth,h->nt", hidden, query.astype(hidden.dtype)) * hidden.shape[-1] ** -0.5
        weights = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(scores.dtype).min / 2), axis=-1)
        return jnp.einsum("nt,nth->nh", weights, hidden)


def pack_head_rows(target_mask: np.ndarray, target_ids: np.ndarray, rows_per_note: int) -> dict[str, np.ndarray] | None:
    """The supervised slots of a host batch packed for the LM head: head_index [C] (flat indices into the
    N x M slots, in order), head_target_ids and head_target_mask [C], C = rows_per_note x N, the unused tail
    pointing at slot 0 with mask 0. None when the batch has more supervised slots than C (nothing is dropped:
    the caller runs the unpacked step)."""
    flat = np.flatnonzero(np.asarray(target_mask).reshape(-1) > 0)
    capacity = rows_per_note * target_mask.shape[0]
    if flat.size > capacity:
        return None
    index = np.zeros((capacity,), np.int32)
    index[:flat.size] = flat
    mask = np.zeros((capacity,), np.float32)
    mask[:flat.size] = np.asarray(target_mask).reshape(-1)[flat]
    return {"head_index": index, "head_target_ids": np.asarray(target_ids).reshape(-1)[index].astype(np.int32),
            "head_target_mask": mask}


def check_pairs(pair_id, note_id=None) -> None:
    """Host-side check of one batch: every pair id occurs exactly twice (and note ids, if given, are per row).

    The device loss relies on it: a row without a partner would have no positive logit at all.
    """
    pair_id = np.asarray(pair_id)
    values, counts = np.unique(pair_id, return_counts=True)
    bad = values[counts != 2]
    if bad.size:
        raise ValueError(f"batch pair_id values {bad[:5].tolist()} occur {counts[counts != 2][:5].tolist()} "
                         f"times; every pair id must occur exactly twice (the two notes of one pair)")
    if note_id is not None and np.shape(note_id) != pair_id.shape:
        raise ValueError(f"note ids have shape {np.shape(note_id)}, pair ids {pair_id.shape}: one per row")


def contrastive_loss(embedding: jax.Array, pair_id: jax.Array, tau: jax.Array,
                     note_id: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Symmetric in-batch InfoNCE over all N = 2B notes (METHOD.md 2), duplicate-aware.

    Row i's positive is the other row with the same pair_id; every other row j != i is a negative
    (self-similarity masked), except rows that are the same note as row i or as row i's positive
    (`note_id`): a note in two pairs of one batch, or (A, B) next to (B, A), would otherwise be its own
    negative at similarity 1. Each pair id must occur exactly twice (`check_pairs` on the host); a row
    whose partner count is not one gets a NaN loss, never a silent logit of 0.
    Returns (mean loss, top-1 accuracy of finding the positive among the unmasked rows).
    """
    n = embedding.shape[0]
    sim = jnp.einsum("id,jd->ij", embedding, embedding, preferred_element_type=jnp.float32) * jnp.exp(tau)
    eye = jnp.eye(n, dtype=bool)
    positive = (pair_id[:, None] == pair_id[None, :]) & ~eye
    masked = eye
    if note_id is not None:
        partner_note = jnp.sum(jnp.where(positive, note_id[None, :], 0), axis=-1)  # exactly one positive
        same_note = (note_id[None, :] == note_id[:, None]) | (note_id[None, :] == partner_note[:, None])
        masked = masked | (same_note & ~positive)
    sim = jnp.where(masked, -jnp.inf, sim)
    log_denominator = jax.nn.logsumexp(sim, axis=-1)
    positive_logit = jnp.sum(jnp.where(positive, sim, 0.0), axis=-1)
    positive_logit = jnp.where(positive.sum(-1) == 1, positive_logit, jnp.nan)
    loss = jnp.mean(log_denominator - positive_logit)
    accuracy = jnp.mean(jnp.take_along_axis(positive, jnp.argmax(sim, axis=-1)[:, None], axis=1)[:, 0])
    return loss, accuracy


def generation_loss(logits: jax.Array, target_ids: jax.Array, target_mask: jax.Array) -> jax.Array:
    """Next-token cross-entropy on the supervised (output + EOS) tokens, mean over those tokens."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, target_ids[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = target_mask.astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def needs_logits(objective: str) -> bool:
    """Whether training with `objective` needs the generation logits: "gcl_only" (w/o CSFT) does not, so its
    step skips the LM head and computes the last layer at [EMB]'s read row alone (gradients unchanged)."""
    return objective != "gcl_only"


def combine_losses(l_cl: jax.Array, l_gen: jax.Array | None, alpha: float, objective: str) -> jax.Array:
    """L = (L_cl + alpha L_gen) / (1 + alpha); the ablations keep one term ("gcl_only" needs no L_gen)."""
    if objective != "gcl_only" and objective in OBJECTIVES and l_gen is None:
        raise ValueError(f"objective {objective!r} needs the generation loss: compute the generation logits")
    if objective == "notellm":
        return (l_cl + alpha * l_gen) / (1.0 + alpha)
    if objective == "gcl_only":
        return l_cl
    if objective == "csft_only":
        return l_gen
    raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")


def notellm_losses(outputs: dict[str, jax.Array], batch: dict[str, jax.Array], alpha: float,
                   objective: str) -> dict[str, Any]:
    l_cl, accuracy = contrastive_loss(outputs["embedding"], batch["pair_id"], outputs["log_logit_scale"],
                                      batch.get("note_index"))
    metrics = {"loss_cl": l_cl, "accuracy": accuracy, "log_logit_scale": outputs["log_logit_scale"]}
    l_gen = None
    if "gen_logits" in outputs:  # absent when a "gcl_only" step skips the head: then no loss_gen is reported
        packed = "head_index" in batch  # the head ran at the packed rows (`pack_head_rows`)
        ids, mask = (batch["head_target_ids"], batch["head_target_mask"]) if packed else \
            (batch["target_ids"], batch["target_mask"])
        l_gen = metrics["loss_gen"] = generation_loss(outputs["gen_logits"], ids, mask)
    return {"loss": combine_losses(l_cl, l_gen, alpha, objective), **metrics}
