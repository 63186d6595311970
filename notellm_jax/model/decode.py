"""Greedy decoding with the model's KV cache (the one decode loop) and `CausalLM`, the loaded-model API.

One jitted program per (batch shape, max_new_tokens, penalty, constrained or not): the cache is
prefilled with the whole padded prompt batch (left or right padding; the cache masks pads), then one
token per row is fed back per step inside `jax.lax.while_loop`, which ends early once every row has
produced EOS. Finished rows are filled with EOS.

Per step the next-token logits pass, in Hugging Face's order, through
- the repetition penalty (HF `RepetitionPenaltyLogitsProcessor` arithmetic: a logit < 0 is multiplied
  by the penalty, any other is divided by it) applied to the tokens this call has already generated.
  Unlike HF, prompt tokens are not penalised: a note's hashtags and category often repeat words of
  its title, and penalising them would push the model away from the right answer;
- an optional `TokenTrie` mask: only the children of each row's current trie state may be chosen, so
  every output is one of the trie's token sequences (e.g. the closed category set, each ending in EOS).
The trie is a compact transition table ([states, max fan-out] child tokens and child states), not a
dense [states, vocab] mask, so it stays small for 50k-token vocabularies; the [batch, vocab] mask is
scattered from the current states' children inside the loop.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from notellm_jax.model.families import LlamaConfig
from notellm_jax.model.llama import Llama, init_cache
from notellm_jax.model.params import sharded_abstract_params

NO_CHILD = -1


@dataclasses.dataclass(frozen=True)
class TokenTrie:
    """Prefix tree over token sequences that all end with `end_id`. State 0 is the root; state s may
    continue with token `tokens[s, j]` (NO_CHILD pads the row) into state `next_state[s, j]`."""
    tokens: np.ndarray       # [num_states, max_fanout] int32
    next_state: np.ndarray   # [num_states, max_fanout] int32
    depth: int               # longest sequence, end token included: the most steps a constrained row needs

    @classmethod
    def build(cls, sequences: Iterable[Sequence[int]], end_id: int) -> TokenTrie:
        """Every sequence must end with `end_id` and contain it nowhere else (so each leaf is an end)."""
        children: list[dict[int, int]] = [{}]
        depth = 0
        for number, seq in enumerate(sequences):
            seq = [int(t) for t in seq]
            if not seq or seq[-1] != end_id or end_id in seq[:-1]:
                raise ValueError(f"trie sequence {number} {seq} must end with the end token {end_id} "
                                 "and contain it only there")
            state = 0
            for token in seq:
                if token not in children[state]:
                    children[state][token] = len(children)
                    children.append({})
                state = children[state][token]
            depth = max(depth, len(seq))
        if depth == 0:
            raise ValueError("a token trie needs at least one sequence")
        fanout = max(len(c) for c in children)
        tokens = np.full((len(children), fanout), NO_CHILD, np.int32)
        next_state = np.zeros((len(children), fanout), np.int32)
        for state, kids in enumerate(children):
            tokens[state, :len(kids)] = list(kids)
            next_state[state, :len(kids)] = list(kids.values())
        return cls(tokens, next_state, depth)


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """HF arithmetic on the `seen` [B, V] tokens: negative logits times `penalty`, others divided by it."""
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def _allowed_by_trie(trie_tokens: jax.Array, state: jax.Array, vocab: int) -> jax.Array:
    """[B, V] mask of the children of each row's trie state (NO_CHILD entries scatter out of range)."""
    kids = trie_tokens[state]
    kids = jnp.where(kids == NO_CHILD, vocab, kids)
    rows = jnp.arange(kids.shape[0])[:, None]
    return jnp.zeros((kids.shape[0], vocab), bool).at[rows, kids].set(True, mode="drop")


def _advance_trie(trie: tuple[jax.Array, jax.Array], state: jax.Array, token: jax.Array) -> jax.Array:
    match = trie[0][state] == token[:, None]
    return jnp.where(match.any(-1), trie[1][state, jnp.argmax(match, axis=-1)], state)


def greedy_decode(model: Llama, params: Any, ids: np.ndarray, mask: np.ndarray, max_new_tokens: int,
                  eos_id: int, repetition_penalty: float = 1.0, trie: TokenTrie | None = None,
                  prefix_end: np.ndarray | None = None, prefix_from_layer: int = 0) -> np.ndarray:
    """[B, max_new_tokens] greedy continuations of the padded prompts `ids` (mask: 1 = real token).

    `eos_id` = -1 never stops. With `trie`, max_new_tokens must cover `trie.depth` so no constrained
    row is cut before its end token. `prefix_end` [B] (slots of `ids`): the prompt's bidirectional prefix
    in layers from `prefix_from_layer` on (`llama.attention_allowed`); it is prefilled with the prompt, and
    every generated token, after it, attends causally.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    tables = None
    if trie is not None:
        if max_new_tokens < trie.depth:
            raise ValueError(f"max_new_tokens={max_new_tokens} is shorter than the longest constrained "
                             f"sequence ({trie.depth} tokens with the end token)")
        if int(trie.tokens.max()) >= model.config.vocab_size:
            raise ValueError(f"trie token {int(trie.tokens.max())} is outside the model's "
                             f"{model.config.vocab_size}-token vocabulary")
        tables = (jnp.asarray(trie.tokens), jnp.asarray(trie.next_state))
    prefix = None if prefix_end is None else jnp.asarray(prefix_end, jnp.int32)
    out = _decode(model, params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), int(max_new_tokens),
                  float(repetition_penalty), jnp.int32(eos_id), tables, prefix, int(prefix_from_layer))
    return np.asarray(out, np.int32)


@partial(jax.jit, static_argnums=(0, 4, 5, 9))
def _decode(model: Llama, params: Any, ids: jax.Array, mask: jax.Array, max_new_tokens: int, penalty: float,
            eos_id: jax.Array, trie: tuple[jax.Array, jax.Array] | None, prefix_end: jax.Array | None, prefix_from_layer: int) -> jax.Array:
    """Prefill the cache with the prompt, then feed back one chosen token per step."""
    batch, length = ids.shape
    vocab = model.config.padded_vocab_size  # the logits' width; padded entries are masked by Llama.logits
    variables = {"params": params}
    cache = init_cache(model.config, batch, length + max_new_tokens)
    hidden, cache = model.apply(variables, ids, mask, cache=cache, prefix_end=prefix_end,
                                prefix_from_layer=prefix_from_layer)
    last_real = length - 1 - jnp.argmax(mask[:, ::-1], axis=1)  # right padding: last real token, not slot T-1
    last_hidden = hidden[jnp.arange(batch), last_real][:, None]

    def choose(hidden_1: jax.Array, done: jax.Array, seen, state):
        logits = model.apply(variables, hidden_1, method=Llama.logits)[:, 0].astype(jnp.float32)
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, penalty)
        if trie is not None:
            logits = jnp.where(_allowed_by_trie(trie[0], state, vocab), logits, -jnp.inf)
        token = jnp.where(done, eos_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        if seen is not None:
            seen = seen.at[jnp.arange(batch), token].set(True)
        if trie is not None:
            state = _advance_trie(trie, state, token)
        return token, done | (token == eos_id), seen, state

    def step(carry):
        i, out, token, done, cache, seen, state = carry
        hidden_1, cache = model.apply(variables, token[:, None], jnp.ones((batch, 1), jnp.int32), cache=cache)
        token, done, seen, state = choose(hidden_1, done, seen, state)
        return i + 1, out.at[:, i].set(token), token, done, cache, seen, state

    seen = jnp.zeros((batch, vocab), bool) if penalty != 1.0 else None
    state = jnp.zeros((batch,), jnp.int32) if trie is not None else None
    token, done, seen, state = choose(last_hidden, jnp.zeros((batch,), bool), seen, state)
    out = jnp.full((batch, max_new_tokens), eos_id, jnp.int32).at[:, 0].set(token)
    carry = (jnp.int32(1), out, token, done, cache, seen, state)
    carry = jax.lax.while_loop(lambda c: (c[0] < max_new_tokens) & ~jnp.all(c[3]), step, carry)
    return carry[1]


# ----------------------------------------------------------------------------------------------------
# The causal-LM API

Params = dict[str, Any]


def _as_batch(input_ids: Any, attention_mask: Any) -> tuple[np.ndarray, np.ndarray, bool]:
    """[B, T] int32 ids and mask (1-D inputs become a batch of one; the flag says to squeeze back)."""
    ids = np.asarray(input_ids)
    single = ids.ndim == 1
    ids = np.atleast_2d(ids).astype(np.int32)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, length] with length > 0, got shape {np.shape(input_ids)}")
    mask = np.ones_like(ids) if attention_mask is None else np.atleast_2d(np.asarray(attention_mask)).astype(np.int32)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
    if not mask.any(axis=1).all():
        raise ValueError(f"rows {np.flatnonzero(~mask.any(axis=1)).tolist()} of attention_mask have no real token")
    return ids, mask, single


class CausalLM:
    """A loaded LLaMA: `logits` for scoring, greedy `generate` with the model's KV cache (numpy in and out)."""

    def __init__(self, params: Params, config: LlamaConfig, mesh: jax.sharding.Mesh | None = None):
        """params: host arrays, or jax.Arrays already placed (`load_causal_lm(..., mesh=)`). Host params are
        laid out over `mesh` by the logical rules (default: the first device alone)."""
        self.config = config
        self.model = Llama(config)
        if mesh is None:
            mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
        abstract = sharded_abstract_params(config, mesh)
        self.params = jax.tree.map(lambda p, a: p if isinstance(p, jax.Array) else
                                   jax.device_put(np.asarray(p, a.dtype), a.sharding), params, abstract)

    def logits(self, input_ids: Any, attention_mask: Any = None) -> np.ndarray:
        """float32 [B, T, V] logits (pad positions hold values for the pad token; ignore them)."""
        ids, mask, single = _as_batch(input_ids, attention_mask)
        logits = np.asarray(_forward_logits(self.model, self.params, ids, mask), np.float32)
        logits = logits[..., :self.config.vocab_size]  # the padded entries are never predicted
        return logits[0] if single else logits

    def generate(self, input_ids: Any, max_new_tokens: int, attention_mask: Any = None,
                 eos_id: int | None = None) -> np.ndarray:
        """Greedy decoding: [B, T + max_new_tokens], the prompt followed by the new tokens (as HF's
        generate). Left or right padded prompts both work (the cache masks pads). A row that produced
        `eos_id` (default config.eos_token_id; -1 never stops) is filled with it; decoding ends early
        once every row has finished."""
        ids, mask, single = _as_batch(input_ids, attention_mask)
        eos = self.config.eos_token_id if eos_id is None else eos_id
        new = greedy_decode(self.model, self.params, ids, mask, int(max_new_tokens), int(eos))
        out = np.concatenate([ids, new], axis=1)
        return out[0] if single else out


@partial(jax.jit, static_argnums=0)
def _forward_logits(model: Llama, params: Params, ids: jax.Array, mask: jax.Array) -> jax.Array:
    hidden = model.apply({"params": params}, ids, mask)
    return model.apply({"params": params}, hidden, method=Llama.logits).astype(jnp.float32)
