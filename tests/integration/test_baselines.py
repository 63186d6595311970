"""job.baselines: unit vectors with the right ids, each baseline equal to a direct computation.

LLM baselines run the real stories260K model (configs/tiny.py); the reference is the project's Llama on
one unpadded sequence and numpy for the read-out. SentenceBERT is compared with sentence-transformers'
own `encode` on the same model folder.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from notellm_jax.eval.baselines import PROMPTEOL_TEMPLATE, embed_baseline, llm_text, sbert_model_dir
from notellm_jax.weights.formats import load_params
from notellm_jax.config import load_config
from notellm_jax.data import store
from notellm_jax.infer.embeddings import read_embeddings, read_embeddings_meta
from notellm_jax.model.llama import Llama
from notellm_jax.sharding import make_mesh
from notellm_jax.weights.tokenizer import resolve_tokenizer

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.py")
TITLES = ["How fine should I grind for espresso?", "Is stout good with chocolate?", "Why is my tea bitter?",
          "Can I freeze coffee beans?", "What glass for a lager?"]
LONG = "Water temperature matters a great deal when you brew a cup, and so does the grind size. " * 6


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory) -> Path:
    """A prepared-data folder: 5 notes (the test notes are 0, 2, 4), 4 training pairs."""
    work = tmp_path_factory.mktemp("baselines")
    data = work / "data"
    data.mkdir()
    ids = [f"site/{i}" for i in range(len(TITLES))]
    contents = ["Short body.", LONG, "", "Beans in the freezer?", LONG[:200]]
    store.write_notes({"note_id": ids, "title": TITLES, "content": contents, "topics": [["t"]] * 5,
                       "category": ["coffee", "beer", "tea", "coffee", "beer"], "created_at": list(range(5)),
                       "exposure": [1, 2, 3, 4, 5]}, data / "notes.parquet")
    (data / "split.json").write_text(json.dumps({"test_notes": ids[::2], "train_notes": ids[1::2]}))
    store.write_pairs({"note_a": ids[:4], "note_b": ids[1:], "score": [1.0] * 4}, data / "pairs_train.parquet")
    return work


def config_for(work: Path, *extra: str):
    return load_config(TINY, [f"paths.work_dir={work}", "embed.batch_size=8", *extra])


@pytest.mark.parametrize("name", ["llm_last_token", "prompteol"])
def test_llm_baselines_equal_direct_last_token(work_dir, tmp_path, name):
    config = config_for(work_dir, "embed.length_buckets=1")  # one compile
    out = embed_baseline(config, name, tmp_path / name, mesh=make_mesh(1, -1, 1))
    ids, vectors = read_embeddings(out)
    assert ids == ["site/0", "site/2", "site/4"]  # None = the test notes, in notes.parquet order
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    tokenizer = resolve_tokenizer(config)
    params, llama_cfg = load_params(config.resolve(config.model.checkpoint))
    notes = {n.note_id: n for n in store.load_notes(work_dir / "data" / "notes.parquet")}
    for row, note_id in enumerate(ids):
        text = llm_text(notes[note_id], tokenizer, config.prompt, name)
        tokens = [tokenizer.bos_id] + tokenizer.encode(text, split_special_tokens=True)
        hidden = np.asarray(Llama(llama_cfg).apply({"params": params}, np.asarray([tokens], np.int32)))[0, -1]
        np.testing.assert_allclose(vectors[row], hidden / np.linalg.norm(hidden), atol=2e-5)
    assert read_embeddings_meta(out)["dim"] == llama_cfg.hidden_size


def test_llm_text_budgets_and_template(work_dir):
    config = config_for(work_dir, "prompt.title_max_tokens=64")  # titles whole; content over its 32 tokens
    tokenizer = resolve_tokenizer(config)
    short, long = store.load_notes(work_dir / "data" / "notes.parquet")[:2]
    assert llm_text(short, tokenizer, config.prompt, "prompteol") == PROMPTEOL_TEMPLATE.format(
        f"{short.title}\n{short.content}")
    title, content = llm_text(long, tokenizer, config.prompt, "llm_last_token").split("\n")
    assert long.content.startswith(content) and len(content) < len(long.content)
    assert len(tokenizer.encode(content, split_special_tokens=True)) <= config.prompt.content_max_tokens


def test_sbert_zeroshot_equals_encode(work_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    config = config_for(work_dir)
    out = embed_baseline(config, "sbert_zeroshot", tmp_path / "sbert", note_ids=["site/3", "site/1", "site/0"])
    ids, vectors = read_embeddings(out)
    assert ids == ["site/0", "site/1", "site/3"]
    notes = {n.note_id: n for n in store.load_notes(work_dir / "data" / "notes.parquet")}
    model = SentenceTransformer(str(sbert_model_dir()), device="cpu")
    model.max_seq_length = config.baselines.sbert_max_tokens
    expected = model.encode([f"{notes[i].title}\n{notes[i].content}" for i in ids], normalize_embeddings=True)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)


def test_sbert_finetuned_moves_and_records(work_dir, tmp_path):
    config = config_for(work_dir, "baselines.sbert_finetune_steps=2", "baselines.sbert_finetune_batch_pairs=2",
                        "baselines.sbert_learning_rate=1e-3")
    base = read_embeddings(embed_baseline(config, "sbert_zeroshot", tmp_path / "zero"))[1]
    out = embed_baseline(config, "sbert_finetuned", tmp_path / "tuned")
    ids, tuned = read_embeddings(out)
    assert ids == ["site/0", "site/2", "site/4"]
    np.testing.assert_allclose(np.linalg.norm(tuned, axis=1), 1.0, atol=1e-5)
    assert np.abs(tuned - base).max() > 1e-3  # the two steps changed the model
    finetune = read_embeddings_meta(out)["finetune"]
    assert (finetune["steps"], finetune["pairs_used"], finetune["pairs_available"]) == (2, 4, 4)
    assert all(np.isfinite(finetune["losses"]))


def test_bad_baseline_input(work_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown baseline 'tfidf'"):
        embed_baseline(config_for(work_dir), "tfidf", tmp_path)
    with pytest.raises(ValueError, match="bm25 has no embeddings: score it with notellm recall --bm25"):
        embed_baseline(config_for(work_dir), "bm25", tmp_path)  # lexical: scored, never embedded
    with pytest.raises(ValueError, match="not in notes.parquet: \\['nope'\\]"):
        embed_baseline(config_for(work_dir), "sbert_zeroshot", tmp_path, note_ids=["site/0", "nope"])
    with pytest.raises(ValueError, match="need pretrained weights"):
        embed_baseline(config_for(work_dir, "model.checkpoint=random:stories260k"), "prompteol", tmp_path)
