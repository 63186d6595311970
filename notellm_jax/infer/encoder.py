"""The note encoder: a NoteLLM export (or any `apply`) turned into fixed-shape, jitted embedding batches.

Every note gets the category-task prompt of the export (METHOD.md 1, built by `prompts.build_example`, the
one prompt builder) and its embedding is read at the token just before `[EMB]`. Attention is causal, so
nothing after that token can change it: only the prefix up to it is fed, and the read position is then
always the last real token. Notes are embedded in fixed-shape, jitted batches: sorted by length within a
chunk and padded to the smallest of a few bucket lengths (one compile each), the batch axis sharded over
the mesh's data x fsdp devices, the parameters laid out by the logical sharding rules (or, with
`embed.batch_tokens`, cut to a token budget: `BatchEmbedder.plan`). The prompt prefix every note shares can
run once into a key/value cache (`infer.prefix`, `prefix_apply`), the frozen bottom's feature cache included.
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
import numpy as np
from flax import linen as nn
from flax.traverse_util import flatten_dict

from notellm_jax import sharding as shd
from notellm_jax.config import Config
from notellm_jax.data.prompts import Note, PromptTooLongError, build_example, example_from_tokens, pad_batch
from notellm_jax.infer.embeddings import ChunkEmbedder
from notellm_jax.infer.feature_cache import FeatureCache, cache_path
from notellm_jax.infer.prefix import prefix_decode, prefix_kv
from notellm_jax.model.params import abstract_boxed_params, frozen_layer_count, split_params
from notellm_jax.weights.export import export_model, load_notellm
from notellm_jax.weights.tokenizer import resolve_tokenizer

CHUNK_BATCHES = 16  # batches per length-sorted chunk (also the progress-report interval)
TOKEN_STEP = 16  # with embed.batch_tokens, sequences are padded to a multiple of this many tokens
CALL_COST = 256  # token positions one call costs beyond its rows x length (so fewer calls win a tie)

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


def token_rows(shards: int, batch_tokens: int) -> list[int]:
    """Row counts of token-budget batches: `shards` x 1, 2, 3, 4, 6, 8, 12, ... (powers of two and 1.5 times
    them, so the one partial batch is less than half filler rows) while rows x TOKEN_STEP fits `batch_tokens`."""
    multiples = sorted({2 ** j for j in range(24)} | {3 * 2 ** j for j in range(23)})
    return [shards * m for m in multiples if m == 1 or shards * m * TOKEN_STEP <= batch_tokens]


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

    The vector of a sequence is read at its last real token (`read_index`). Sequences are sorted by length and
    cut into batches (`plan`). By default a batch has a bucket length and `batch_size` rows, or with
    `row_buckets` the fewest of those row counts that hold them (the service: a lone request must not pay for
    a full batch of padding rows), so the jitted function compiles once per (length, rows) bucket. With
    `batch_tokens` > 0 a batch instead has rows x length <= batch_tokens, its length its longest member
    rounded up to TOKEN_STEP and its rows one of `token_rows`; the cut is the one that computes the fewest
    token positions (`_token_plan`), and only one batch, of the shortest notes, has filler rows: at most
    (longest bucket / TOKEN_STEP) x len(token_rows) shapes, in practice a few per length step reached.
    """

    def __init__(self, apply: Callable, params: Any, boxed_abstract: Any, mesh, batch_size: int,
                 buckets: Sequence[int], pad_id: int, padding_side: str, source: str,
                 features: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None, extra: Any = None,
                 row_buckets: Sequence[int] = (), batch_tokens: int = 0, prefix: Sequence[int] = ()):
        """`features`, if given, maps (input_ids, attention_mask) to [B, T, H] inputs on the host (the frozen
        bottom's cached features); `apply` then receives those instead of the token ids. `extra`, if given,
        is a pytree placed once on every device and passed to `apply` as a fifth argument (the prompt
        prefix's key/value cache). `row_buckets` that are not multiples of the batch shards or exceed
        `batch_size` are left out; `batch_size` is always one. `batch_tokens`: see the class (0 = fixed rows).
        `prefix`: the tokens `extra` holds the key/value cache of (the callers strip them from every sequence)."""
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        if batch_size < 1 or batch_size % shards:
            raise ValueError(f"embed.batch_size={batch_size} must be a positive multiple of the "
                             f"{shards} devices on the mesh's data x fsdp axes")
        if batch_tokens < 0:
            raise ValueError(f"embed.batch_tokens={batch_tokens} must be >= 0 (0 = batches of batch_size rows)")
        _check_params(params, boxed_abstract, source)
        param_shardings = shd.logical_shardings(boxed_abstract, mesh)
        self.params = jax.device_put(params, param_shardings)
        self.batch_size, self.buckets, self.devices = batch_size, sorted(buckets), mesh.devices.size
        self.pad_id, self.padding_side = pad_id, padding_side
        self.row_buckets = sorted({r for r in row_buckets if 0 < r <= batch_size and r % shards == 0} | {batch_size})
        self.batch_tokens, self.prefix = batch_tokens, list(prefix)
        self.token_rows = token_rows(shards, batch_tokens) if batch_tokens else []

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
        """The padded length a sequence of `length` tokens runs at (its bucket, or with `batch_tokens` its
        length rounded up to TOKEN_STEP)."""
        if length > self.buckets[-1]:
            raise ValueError(f"a sequence of {length} tokens exceeds the longest bucket ({self.buckets[-1]})")
        if self.batch_tokens:
            return -(-length // TOKEN_STEP) * TOKEN_STEP
        return next(bucket for bucket in self.buckets if length <= bucket)

    def plan(self, lengths: Sequence[int]) -> list[tuple[np.ndarray, int, int]]:
        """(indices of the members, rows, padded length) of each call that embeds sequences of `lengths`."""
        order = np.argsort(lengths, kind="stable")
        if not self.batch_tokens:
            cuts = [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]
            return [(rows, next(r for r in self.row_buckets if r >= len(rows)),
                     self.bucket(max(lengths[i] for i in rows))) for rows in cuts]
        return self._token_plan(order, [self.bucket(lengths[i]) for i in order])

    def _token_plan(self, order: np.ndarray, padded: list[int]) -> list[tuple[np.ndarray, int, int]]:
        """The cheapest cut of length-sorted sequences (`padded`: their lengths on the TOKEN_STEP grid) into
        calls of `token_rows` rows within the budget, a call costing its rows x length plus CALL_COST: full
        calls, and one call whose filler rows pad it to a row count, holding the shortest sequences."""
        rows_of = lambda n: next((r for r in self.token_rows if r >= n), None)  # noqa: E731
        fits = lambda r, length: r == self.token_rows[0] or r * length <= self.batch_tokens  # noqa: E731
        best: list[tuple[float, int]] = [(0.0, 0)]  # (cost of the first i sequences, size of their last call)
        for i in range(1, len(padded) + 1):
            rows = rows_of(i)
            first = ((rows * padded[i - 1] + CALL_COST, i) if rows and fits(rows, padded[i - 1])
                     else (float("inf"), i))
            best.append(min([first] + [(best[i - r][0] + r * padded[i - 1] + CALL_COST, r)
                                       for r in self.token_rows if r <= i and fits(r, padded[i - 1])]))
        calls, end = [], len(padded)
        while end:
            size = best[end][1]
            calls.append((order[end - size:end], rows_of(size), padded[end - 1]))
            end -= size
        return calls[::-1]

    def _batch(self, token_lists: list[list[int]], rows: int, length: int) -> dict[str, np.ndarray]:
        """Padded arrays (the read index travels in pad_batch's embed_read_pos); filler rows are all padding."""
        examples = [example_from_tokens(t, len(t) - 1, len(t), "category") for t in token_lists]
        padded = pad_batch(examples, length, self.padding_side, self.pad_id, max_targets=0)
        fill = rows - len(token_lists)
        out = {k: np.pad(padded[k], [(0, fill)] + [(0, 0)] * (padded[k].ndim - 1))
               for k in ("input_ids", "attention_mask", "embed_read_pos")}
        out["input_ids"][len(token_lists):] = self.pad_id
        return out

    def __call__(self, token_lists: Sequence[list[int]]) -> np.ndarray:
        empty = [i for i, t in enumerate(token_lists) if not t]
        if empty:
            raise ValueError(f"empty token sequences at positions {empty[:5]}")
        out: np.ndarray | None = None
        for rows, row_count, length in self.plan([len(t) for t in token_lists]):
            batch = self._batch([token_lists[r] for r in rows], row_count, length)
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
                           row_buckets: Sequence[int] = (), cache_lru: bool = False,
                           batch_tokens: int = 0) -> tuple[BatchEmbedder, Any]:
    """(embedder, feature cache or None). With `cache_dir` and an export trained with frozen lower layers,
    the frozen bottom runs through the shared FeatureCache (every fine-tuned variant of one base model
    embeds the same test prompts: the bottom runs once for all of them). With `prefix` (the tokens every
    prompt starts with), their key/value cache is computed once here and the embedder takes each note's
    tokens after the prefix only (`embedder.prefix`; its buckets then cover max_length less the prefix): the
    whole model (`prefix_apply`), or the frozen bottom (its features are then those of the tokens after the
    prefix) and the trained top. Not where the prefix is not shared: a bidirectional prefix sees the note's
    tokens, a pooling reads the prefix rows (`embedder.prefix` is then empty). `row_buckets`, `batch_tokens`:
    see `BatchEmbedder`; `cache_lru`: the feature cache evicts (`FeatureCache`)."""
    model = export_model(export)
    frozen_layers = frozen_layer_count(export.meta.get("train_top_layers", 0), export.llama)
    boxed = abstract_boxed_params(model)
    prefix = list(prefix) if model.bidirectional_from < 0 and model.pooling == "emb" else []
    kv = None
    if prefix:
        _check_params(export.params, boxed, source)  # before the prefix runs through them
        kv = prefix_kv(model, export.params, prefix)
    cache = None
    if cache_dir is not None and frozen_layers:
        frozen = split_params(export.params, frozen_layers)[1]
        cache = FeatureCache(model, mesh, frozen_layers, max_bytes=cache_max_bytes, lru=cache_lru,
                             path=cache_path(cache_dir, export.meta.get("checkpoint", "model"), frozen_layers, frozen),
                             prefix=prefix, prefix_kv=None if kv is None else jax.tree.map(lambda x: x[:frozen_layers], kv))
    first = frozen_layers if cache is not None else 0

    def apply(params, inputs, attention_mask, read_index):
        key = "hidden_in" if cache is not None else "input_ids"
        batch = {key: inputs, "attention_mask": attention_mask, "embed_read_pos": read_index}
        return model.apply({"params": params}, batch, first_layer=first, with_logits=False)["embedding"]

    features = (lambda ids, mask: cache.features(frozen, ids, mask)) if cache is not None else None
    embedder = BatchEmbedder(partial(prefix_apply, model, first_layer=first) if prefix else apply, export.params,
                             boxed, mesh, batch_size, bucket_lengths(max_length - len(prefix), bucket_count), pad_id,
                             padding_side, source, features=features, extra=kv, row_buckets=row_buckets,
                             batch_tokens=batch_tokens, prefix=prefix)
    return embedder, cache


def prefix_apply(model, params: Any, inputs, attention_mask, read_index, kv: dict[str, Any], first_layer: int = 0):
    """Embeddings of [B, T] note tokens (or, from `first_layer` on, the frozen bottom's [B, T, H] features of
    them) that follow the cached prefix (`infer.prefix`)."""
    def run(m):
        return m.embed_hidden(prefix_decode(m.decoder, inputs, attention_mask, kv, first_layer), read_index)

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
    # The service's batcher plans its calls by length bucket and row count: it keeps the fixed-row batches.
    batch_tokens = 0 if serving else config.embed.batch_tokens
    cache_dir = config.data_dir if config.model.cache_frozen_features and config.model.persist_feature_cache else None
    embedder, cache = notellm_batch_embedder(
        export, mesh, batch_size or config.embed.batch_size, prompt.max_length, config.embed.length_buckets,
        tokenizer.pad_id, prompt.padding_side, source, cache_dir=cache_dir, prefix=prefix,
        cache_max_bytes=config.serve.feature_cache_max_mb * 1e6 if serving else config.model.feature_cache_max_gb * 1e9,
        row_buckets=row_buckets, cache_lru=serving, batch_tokens=batch_tokens)
    return NoteEncoder(export, embedder, cache, tokenizer, prompt, embedder.buckets, source, embedder.prefix)
