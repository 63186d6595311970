"""The note encoder: a NoteLLM export (or any `apply`) turned into fixed-shape, jitted embedding batches.

Every note gets the category-task prompt of the export (METHOD.md 1, built by `prompts.build_example`, the
one prompt builder) and its embedding is read at the token just before `[EMB]`. Attention is causal, so
nothing after that token can change it: only the prefix up to it is fed, and the read position is then
always the last real token. Notes are embedded in fixed-shape, jitted batches: sorted by length within a
chunk and padded to the smallest of a few bucket lengths (one compile each), the batch axis sharded over
the mesh's data x fsdp devices, the parameters laid out by the logical sharding rules. The prompt prefix
every note shares can run once into a key/value cache (`prefix_kv`, `prefix_apply`).
Used by `notellm embed` (`infer.embed`), the baselines (`eval.baselines`) and the service (`serve`); what it
produces is written in the embeddings format of `infer.embeddings`.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.traverse_util import flatten_dict

from notellm_jax import sharding as shd
from notellm_jax.config import Config
from notellm_jax.data.prompts import Note, PromptTooLongError, build_example, example_from_tokens, pad_batch
from notellm_jax.infer.embeddings import ChunkEmbedder
from notellm_jax.infer.feature_cache import FeatureCache, cache_path
from notellm_jax.model.llama import init_cache
from notellm_jax.model.params import abstract_boxed_params, frozen_layer_count, split_params
from notellm_jax.weights.export import export_model, load_notellm
from notellm_jax.weights.tokenizer import resolve_tokenizer

CHUNK_BATCHES = 16  # batches per length-sorted chunk (also the progress-report interval)

# The two embedder kinds: a BatchEmbedder maps token lists to vectors (fixed shapes on the mesh); a
# ChunkEmbedder (`infer.embeddings`, what its writers stream) maps a chunk of notes to (ids of the embedded
# notes, their vectors [n, d], skipped notes by reason). `<model>_batch_embedder` builds the first kind,
# `<model>_chunk_embedder` the second, and `chunk_embedder` wraps a batch embedder into a chunk one.


# --------------------------------------------------------------------------------------------------
# Fixed-shape, length-bucketed, sharded batches


def bucket_lengths(max_length: int, count: int) -> list[int]:
    """`count` evenly spaced lengths up to max_length, rounded up to multiples of 8 (the last covers max_length)."""
    if count < 1:
        raise ValueError(f"embed.length_buckets must be >= 1, got {count}")
    ceil_div = lambda a, b: -(-a // b)  # noqa: E731
    return sorted({8 * ceil_div(ceil_div(max_length * (i + 1), count), 8) for i in range(count)})


def _check_params(params: Any, boxed_abstract: Any, source: str) -> None:
    """Every parameter the model needs is present with its shape, and nothing else: else the weights
    belong to another model."""
    expected = {k: v.shape for k, v in flatten_dict(nn.meta.unbox(boxed_abstract)).items()}
    got = {k: np.shape(v) for k, v in flatten_dict(params).items()}
    problems = [f"{'/'.join(k)}: missing" for k in expected if k not in got]
    problems += [f"{'/'.join(k)}: unexpected" for k in got if k not in expected]
    problems += [f"{'/'.join(k)}: shape {got[k]}, model needs {s}" for k, s in expected.items()
                 if k in got and tuple(got[k]) != tuple(s)]
    if problems:
        raise ValueError(f"{source}: parameters do not fit the model ({len(problems)} problems: "
                         f"{'; '.join(problems[:5])})")


class BatchEmbedder:
    """token lists -> [n, d] vectors through `apply(params, input_ids, attention_mask, read_index)`.

    The vector of a sequence is read at its last real token (`read_index`). Batches have a bucket length
    and `batch_size` rows, or with `row_buckets` the fewest of those row counts that hold them (the service:
    a lone request must not pay for a full batch of padding rows), so the jitted function compiles once per
    (length, rows) bucket.
    """

    def __init__(self, apply: Callable, params: Any, boxed_abstract: Any, mesh, batch_size: int,
                 buckets: Sequence[int], pad_id: int, padding_side: str, source: str,
                 features: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None, extra: Any = None,
                 row_buckets: Sequence[int] = ()):
        """`features`, if given, maps (input_ids, attention_mask) to [B, T, H] inputs on the host (the frozen
        bottom's cached features); `apply` then receives those instead of the token ids. `extra`, if given,
        is a pytree placed once on every device and passed to `apply` as a fifth argument (the prompt
        prefix's key/value cache). `row_buckets` that are not multiples of the batch shards or exceed
        `batch_size` are left out; `batch_size` is always one."""
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        if batch_size < 1 or batch_size % shards:
            raise ValueError(f"embed.batch_size={batch_size} must be a positive multiple of the "
                             f"{shards} devices on the mesh's data x fsdp axes")
        _check_params(params, boxed_abstract, source)
        param_shardings = shd.logical_shardings(boxed_abstract, mesh)
        self.params = jax.device_put(params, param_shardings)
        self.batch_size, self.buckets, self.devices = batch_size, sorted(buckets), mesh.devices.size
        self.pad_id, self.padding_side = pad_id, padding_side
        self.row_buckets = sorted({r for r in row_buckets if 0 < r <= batch_size and r % shards == 0} | {batch_size})

        def sharded_apply(p, input_ids, attention_mask, read_index, extra_in):
            with shd.axis_rules(mesh):
                return apply(p, input_ids, attention_mask, read_index, *([] if extra is None else [extra_in]))

        rows, matrix = shd.batch_sharding(mesh, 1), shd.batch_sharding(mesh, 2)
        inputs = shd.batch_sharding(mesh, 3) if features else matrix
        self._features = features
        self._extra = None if extra is None else jax.device_put(extra, shd.replicated(mesh))
        self._input_shardings = (inputs, matrix, rows)
        self._fn = jax.jit(sharded_apply, in_shardings=(param_shardings, *self._input_shardings, shd.replicated(mesh)),
                           out_shardings=matrix)

    def bucket(self, length: int) -> int:
        """The padded length a sequence of `length` tokens runs at."""
        for bucket in self.buckets:
            if length <= bucket:
                return bucket
        raise ValueError(f"a sequence of {length} tokens exceeds the longest bucket ({self.buckets[-1]})")

    def _batch(self, token_lists: list[list[int]]) -> dict[str, np.ndarray]:
        """Padded arrays (the read index travels in pad_batch's embed_read_pos); filler rows are all padding."""
        length = self.bucket(max(len(t) for t in token_lists))
        examples = [example_from_tokens(t, len(t) - 1, len(t), "category") for t in token_lists]
        padded = pad_batch(examples, length, self.padding_side, self.pad_id, max_targets=0)
        fill = next(r for r in self.row_buckets if r >= len(token_lists)) - len(token_lists)
        out = {k: np.pad(padded[k], [(0, fill)] + [(0, 0)] * (padded[k].ndim - 1))
               for k in ("input_ids", "attention_mask", "embed_read_pos")}
        out["input_ids"][len(token_lists):] = self.pad_id
        return out

    def __call__(self, token_lists: Sequence[list[int]]) -> np.ndarray:
        empty = [i for i, t in enumerate(token_lists) if not t]
        if empty:
            raise ValueError(f"empty token sequences at positions {empty[:5]}")
        order = np.argsort([len(t) for t in token_lists], kind="stable")
        out: np.ndarray | None = None
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            batch = self._batch([token_lists[r] for r in rows])
            inputs = batch["input_ids"]
            if self._features is not None:
                inputs = self._features(inputs, batch["attention_mask"])
            # Placed explicitly: jit refuses sharded numpy inputs once several processes exist (the mesh
            # here is this process's own devices then, see embed_notes).
            placed = jax.device_put((inputs, batch["attention_mask"], batch["embed_read_pos"]), self._input_shardings)
            vectors = np.asarray(self._fn(self.params, *placed, self._extra))[:len(rows)]
            if out is None:
                out = np.zeros((len(token_lists), vectors.shape[1]), np.float32)
            out[rows] = vectors
        return out if out is not None else np.zeros((0, 0), np.float32)


def chunk_embedder(embedder: Callable[[Sequence[list[int]]], np.ndarray],
                   tokens_of: Callable[[Note], list[int]]) -> ChunkEmbedder:
    """A ChunkEmbedder from token lists -> vectors and a per-note tokeniser; notes whose prompt cannot fit
    are skipped and counted."""
    def embed_chunk(notes: list[Note]) -> tuple[list[str], np.ndarray, Counter]:
        ids, tokens, skipped = [], [], Counter()
        for note in notes:
            try:
                tokens.append(tokens_of(note))
                ids.append(note.note_id)
            except PromptTooLongError:
                skipped["prompt_too_long"] += 1
        return ids, embedder(tokens) if tokens else np.zeros((0, 0), np.float32), skipped
    return embed_chunk


# --------------------------------------------------------------------------------------------------
# NoteLLM


def check_export(export, tokenizer, source: str) -> None:
    """The export must have been trained with this tokenizer. NoteTokenizer always appends [EMB] at
    id = base vocabulary size: the export's last row, or an unused row of a table padded beyond its
    tokenizer (Qwen), so the tokenizer, [EMB] included, must fit the table."""
    vocab = export.llama.vocab_size
    if tokenizer.vocab_size > vocab:
        raise ValueError(f"{source}: the model has a {vocab}-row embedding table but the tokenizer "
                         f"{tokenizer.source} has {tokenizer.vocab_size} tokens ({tokenizer.base_vocab_size} + "
                         f"{tokenizer.emb_token}): the export was trained with another model or tokenizer")


def notellm_batch_embedder(export, mesh, batch_size: int, max_length: int, bucket_count: int, pad_id: int,
                           padding_side: str, source: str, cache_dir: Path | None = None,
                           prefix: Sequence[int] = (), cache_max_bytes: float = float("inf"),
                           row_buckets: Sequence[int] = (), cache_lru: bool = False) -> tuple[BatchEmbedder, Any]:
    """(embedder, feature cache or None). With `cache_dir` and an export trained with frozen lower layers,
    the frozen bottom runs through the shared FeatureCache (every fine-tuned variant of one base model
    embeds the same test prompts: the bottom runs once for all of them). Otherwise, with `prefix` (the
    tokens every prompt starts with), their key/value cache is computed once here and the embedder takes
    each note's tokens after the prefix only (`prefix_apply`; its buckets then cover max_length less the
    prefix). `row_buckets`: see `BatchEmbedder`; `cache_lru`: the feature cache evicts (`FeatureCache`)."""
    model = export_model(export)
    frozen_layers = frozen_layer_count(export.meta.get("train_top_layers", 0), export.llama)
    cache = None
    if cache_dir is not None and frozen_layers:
        frozen = split_params(export.params, frozen_layers)[1]
        cache = FeatureCache(model, mesh, frozen_layers, max_bytes=cache_max_bytes, lru=cache_lru,
                             path=cache_path(cache_dir, export.meta.get("checkpoint", "model"), frozen_layers, frozen))
    boxed = abstract_boxed_params(model)
    if prefix and cache is None and model.bidirectional_from < 0 and model.pooling == "emb":
        # (a bidirectional prefix sees the note's tokens, a pooling reads the prefix rows: neither is shared)
        _check_params(export.params, boxed, source)  # before the prefix runs through them
        kv = prefix_kv(model, export.params, prefix)
        buckets = bucket_lengths(max_length - len(prefix), bucket_count)
        return BatchEmbedder(partial(prefix_apply, model), export.params, boxed, mesh, batch_size, buckets, pad_id,
                             padding_side, source, extra=kv, row_buckets=row_buckets), None
    buckets = bucket_lengths(max_length, bucket_count)

    def apply(params, inputs, attention_mask, read_index):
        key = "hidden_in" if cache is not None else "input_ids"
        batch = {key: inputs, "attention_mask": attention_mask, "embed_read_pos": read_index}
        first = frozen_layers if cache is not None else 0
        return model.apply({"params": params}, batch, first_layer=first, with_logits=False)["embedding"]

    features = (lambda ids, mask: cache.features(frozen, ids, mask)) if cache is not None else None
    embedder = BatchEmbedder(apply, export.params, boxed, mesh, batch_size, buckets, pad_id,
                             padding_side, source, features=features, row_buckets=row_buckets)
    return embedder, cache


def prefix_kv(model, params: Any, prefix: Sequence[int]) -> dict[str, Any]:
    """Keys and values [layers, 1, P, kv_heads, head_dim] of the decoder over the prompt prefix, run once."""
    ids = jnp.asarray([list(prefix)], jnp.int32)
    cache = init_cache(model.llama, 1, len(prefix))
    _, cache = model.apply({"params": params}, ids, jnp.ones_like(ids), cache=cache,
                           method=lambda m, *a, **kw: m.decoder(*a, **kw))
    return {"k": cache["k"], "v": cache["v"]}


def prefix_apply(model, params: Any, input_ids, attention_mask, read_index, kv: dict[str, Any]):
    """Embeddings of [B, T] note tokens that follow the cached prefix: the decoder's cache holds the prefix
    in slots [0, P) for every row, the notes go to slots [P, P + T); positions continue from P."""
    layers, _, p, heads, dim = kv["k"].shape
    b, t = input_ids.shape

    def filled(x):
        return jnp.concatenate([jnp.broadcast_to(x, (layers, b, p, heads, dim)),
                                jnp.zeros((layers, b, t, heads, dim), x.dtype)], axis=2)

    cache = {"k": filled(kv["k"]), "v": filled(kv["v"]), "index": jnp.int32(p),
             "mask": jnp.concatenate([jnp.ones((b, p), jnp.int32), jnp.zeros((b, t), jnp.int32)], axis=1)}

    def run(m):
        hidden, _ = m.decoder(input_ids, attention_mask, cache=cache)
        return m.embed_hidden(hidden, read_index)

    return model.apply({"params": params}, method=run)


def shared_prefix(tokenizer, prompt) -> list[int]:
    """The tokens every category prompt starts with: the common prefix of probe notes whose titles begin
    with different kinds of characters (a letter, 's' after the quote, a digit, punctuation, a space, a
    quote, non-ASCII, nothing), less one token at the boundary for safety. Each note is still checked."""
    probes = ["a", "s", "7", "(", " x", "'", "\u00e9t\u00e9", ""]
    token_lists = [build_example(Note("probe", title, "body", [], "c"), tokenizer, prompt, "category",
                                 with_output=False).input_ids for title in probes]
    common = 0
    while all(len(t) > common and t[common] == token_lists[0][common] for t in token_lists):
        common += 1
    return token_lists[0][:max(0, common - 1)]


@dataclasses.dataclass
class NoteEncoder:
    """A NoteLLM export ready to embed notes: the export's prompt (with the config's padding side), the
    tokenizer checked against the export, and the jitted, bucketed embedder. Shared by `infer.embed.embed_notes`
    and the service (`notellm_jax.serve`)."""
    export: Any
    embedder: BatchEmbedder
    cache: Any                 # the frozen bottom's FeatureCache, or None
    tokenizer: Any
    prompt: Any
    buckets: list[int]
    source: str
    prefix: list[int]          # cached prompt prefix (empty: every note runs its whole prompt)

    def tokens(self, note: Note) -> list[int]:
        """The tokens the embedder runs for `note` (PromptTooLongError if its prompt cannot fit)."""
        return self.encode(note)[0]

    def encode(self, note: Note, report_cuts: bool = False) -> tuple[list[int], bool]:
        """(the category prompt up to the token before [EMB], less the cached prefix if any; whether title or
        content was cut, over its token budget or shrunk to fit max_length: only with `report_cuts`)."""
        example = build_example(note, self.tokenizer, self.prompt, "category", with_output=False)
        tokens = example.input_ids[:example.embed_read_pos + 1]
        if self.prefix:
            if tokens[:len(self.prefix)] != self.prefix:
                raise ValueError(f"note {note.note_id!r}: its prompt does not start with the cached prefix "
                                 "(a tokenizer merge across the boundary); embed with embed.prefix_cache=false")
            tokens = tokens[len(self.prefix):]
        return tokens, report_cuts and was_cut(note, example, self.tokenizer, self.prompt)


def was_cut(note: Note, example, tokenizer, prompt) -> bool:
    """Whether `example` (`note`'s prompt) holds less than the whole title or content: one over its token
    budget, or shrunk to fit max_length."""
    return bool(example.shrunk or any(len(tokenizer.encode(text, split_special_tokens=True)) > budget
                                      for text, budget in ((note.title, prompt.title_max_tokens),
                                                           (note.content, prompt.content_max_tokens))))


def note_encoder(config: Config, export, mesh=None, batch_size: int | None = None,
                 row_buckets: Sequence[int] = (), serving: bool = False) -> NoteEncoder:
    """Load (if a folder) and check a NoteLLM export. Prompt budgets and layout come from the export (what
    the model was trained with); the padding side, buckets and batch size (default embed.batch_size)
    from `config`; the tokenizer is the one the export recorded, resolved against `config`'s roots, and
    checked against the export. `row_buckets`: see `BatchEmbedder`. `serving`: the frozen-bottom feature cache
    gets the service's cap (serve.feature_cache_max_mb, least recently used evicted) instead of training's."""
    source = str(export) if isinstance(export, (str, Path)) else f"export of run {export.meta.get('run')!r}"
    multi_host = jax.process_count() > 1
    # Across hosts each process embeds its own notes on its own devices (no cross-host collective per batch).
    mesh = mesh or (shd.make_mesh(1, -1, 1, devices=jax.local_devices()) if multi_host
                    else shd.mesh_from_config(config.mesh))
    if isinstance(export, (str, Path)):
        export = load_notellm(export, mesh)
    prompt = dataclasses.replace(export.prompt, padding_side=config.prompt.padding_side)
    tokenizer = resolve_tokenizer(config, export.tokenizer, prompt.emb_token)
    check_export(export, tokenizer, source)
    prefix = shared_prefix(tokenizer, prompt) if config.embed.prefix_cache else []
    cache_dir = config.data_dir if config.model.cache_frozen_features and config.model.persist_feature_cache else None
    embedder, cache = notellm_batch_embedder(
        export, mesh, batch_size or config.embed.batch_size, prompt.max_length, config.embed.length_buckets,
        tokenizer.pad_id, prompt.padding_side, source, cache_dir=cache_dir, prefix=prefix,
        cache_max_bytes=config.serve.feature_cache_max_mb * 1e6 if serving else config.model.feature_cache_max_gb * 1e9,
        row_buckets=row_buckets, cache_lru=serving)
    if cache is not None:  # the frozen bottom's features cover whole prompts: no prefix cache there
        prefix = []
    return NoteEncoder(export, embedder, cache, tokenizer, prompt, embedder.buckets, source, prefix)
