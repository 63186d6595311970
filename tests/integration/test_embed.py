"""infer.embed / infer.encoder: batched, bucketed, sharded embeddings equal a direct one-note forward pass; the
streaming shard format round-trips; an export that does not belong to the tokenizer is refused.

The export is built from the real stories260K weights with the trainer's own `load_initial_params`
(a seeded random projection) and `save_notellm`, so no training run is needed.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from notellm_jax.config import load_config
from notellm_jax.data.prompts import Note, build_example
from notellm_jax.infer.embed import embed_notes
from notellm_jax.infer.encoder import bucket_lengths
from notellm_jax.infer.embeddings import EmbeddingWriter, read_embeddings, read_embeddings_meta
from notellm_jax.weights.export import load_notellm, save_notellm
from notellm_jax.model.notellm import NoteLLM
from notellm_jax.sharding import make_mesh
from notellm_jax.weights.tokenizer import resolve_tokenizer
from notellm_jax.weights.loading import load_initial_params

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.py")
WORDS = "the coffee bean was ground fine and brewed slowly with hot water for a rich dark cup".split()


def tiny_config(work_dir: Path, *extra: str):
    return load_config(TINY, [f"paths.work_dir={work_dir}", "embed.batch_size=8", "embed.shard_size=4",
                              "embed.length_buckets=4", *extra])


def make_notes(n: int) -> list[Note]:
    """Notes from empty to long content, so the prompts fall into different length buckets."""
    return [Note(note_id=f"site/{i}", title=f"Question {i} about {WORDS[i % len(WORDS)]}?",
                 content=" ".join(WORDS[:(3 * i) % len(WORDS)] * (i % 3)), topics=["brewing"], category="coffee")
            for i in range(n)]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("embed_run")
    config = tiny_config(work)
    tokenizer = resolve_tokenizer(config)
    params, llama_cfg = load_initial_params(config, tokenizer.vocab_size)
    return save_notellm(work / "export", params, llama_cfg, config)


def direct_embedding(export, tokenizer, note: Note) -> np.ndarray:
    """NoteLLM on the whole unpadded category prefix (with [EMB] and the guidance after it), batch of one."""
    example = build_example(note, tokenizer, export.prompt, "category", with_output=False)
    ids = jnp.asarray([example.input_ids], jnp.int32)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "embed_read_pos": jnp.asarray([example.embed_read_pos])}
    model = NoteLLM(export.llama, emb_dim=export.emb_dim)
    return np.asarray(model.apply({"params": export.params}, batch, with_logits=False)["embedding"][0])


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_embeddings_equal_direct_forward(export_dir, tmp_path, padding_side):
    # 16 buckets (multiples of 16): the prompts here are 144-179 tokens, so they land in three of them.
    config = tiny_config(tmp_path, f"prompt.padding_side={padding_side}", "embed.length_buckets=16")
    export = load_notellm(export_dir)
    tokenizer = resolve_tokenizer(config)
    notes = make_notes(11)  # 11 = one full batch of 8 + a partial one, over 3 shards of 4
    fed = [build_example(n, tokenizer, export.prompt, "category", with_output=False).embed_read_pos + 1 for n in notes]
    buckets = bucket_lengths(export.prompt.max_length, config.embed.length_buckets)
    used = {min(b for b in buckets if b >= length) for length in fed}
    assert len(used) >= 2, f"test notes should span several length buckets, got lengths {fed}"

    mesh = make_mesh(1, -1, 1)  # 8 fake devices: the batch axis is split 8 ways
    out = embed_notes(config, export_dir, notes, tmp_path / "emb", mesh=mesh)
    ids, vectors = read_embeddings(out)
    assert ids == [n.note_id for n in notes]
    expected = np.stack([direct_embedding(export, tokenizer, n) for n in notes])
    np.testing.assert_allclose(vectors, expected, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    meta = read_embeddings_meta(out)
    assert (meta["count"], meta["dim"], len(meta["shards"])) == (11, export.emb_dim, 3)
    assert meta["prompt"]["padding_side"] == padding_side and meta["skipped"] == {}
    assert meta["devices"] == jax.device_count() == 8


def test_shards_round_trip_and_select(tmp_path):
    rng = np.random.default_rng(0)
    ids = [f"n{i}" for i in range(10)]
    vectors = rng.normal(size=(10, 6)).astype(np.float32)
    writer = EmbeddingWriter(tmp_path, shard_size=4)
    for start, stop in [(0, 3), (3, 9), (9, 10)]:  # uneven pieces: shards still hold 4, 4, 2
        writer.add(ids[start:stop], vectors[start:stop])
    writer.close({"model": "random"})
    assert [s["count"] for s in read_embeddings_meta(tmp_path)["shards"]] == [4, 4, 2]
    got_ids, got = read_embeddings(tmp_path)
    assert got_ids == ids
    np.testing.assert_array_equal(got, vectors)
    pick = ["n9", "n0", "n5"]
    _, selected = read_embeddings(tmp_path, pick)
    np.testing.assert_array_equal(selected, vectors[[9, 0, 5]])
    with pytest.raises(ValueError, match="1 of 2 requested notes have no embedding.*'nope'"):
        read_embeddings(tmp_path, ["n1", "nope"])
    # A rerun into the same folder replaces the old shards instead of mixing with them.
    writer = EmbeddingWriter(tmp_path, shard_size=4)
    writer.add(ids[:2], vectors[:2])
    writer.close({"model": "random"})
    assert read_embeddings(tmp_path)[0] == ids[:2] and len(list(tmp_path.glob("*.npy"))) == 1


def test_bad_store_input(tmp_path):
    writer = EmbeddingWriter(tmp_path, shard_size=4)
    with pytest.raises(ValueError, match="line breaks"):
        writer.add(["a\nb"], np.ones((1, 3)))
    writer.add(["a", "b"], np.ones((2, 3)))
    with pytest.raises(ValueError, match="dim changed from 3 to 5"):
        writer.add(["c"], np.ones((1, 5)))
    writer.close({})
    (tmp_path / "ids-00000.txt").write_text("a\n")  # a truncated ids file
    with pytest.raises(ValueError, match="has 2 rows and ids-00000.txt 1 ids"):
        read_embeddings(tmp_path)
    with pytest.raises(FileNotFoundError, match="no embeddings"):
        read_embeddings(tmp_path / "missing")


def test_export_from_another_model_is_refused(export_dir, tmp_path):
    config = tiny_config(tmp_path)
    export = load_notellm(export_dir)
    # +200 rows: beyond the vocab_pad_multiple padding (513 -> 640 rows), so the table's shape differs.
    other_vocab = dataclasses.replace(export, llama=export.llama.replace(vocab_size=export.llama.vocab_size + 200))
    with pytest.raises(ValueError, match=r"embed_tokens/embedding: shape \(640, 64\), model needs \(768, 64\)"):
        embed_notes(config, other_vocab, make_notes(2), tmp_path / "a")
    decoder = {k: v for k, v in export.params["decoder"].items() if k != "layers_4"}
    fewer_layers = dataclasses.replace(export, params={**export.params, "decoder": decoder})
    with pytest.raises(ValueError, match="parameters do not fit the model.*layers_4.*missing"):
        embed_notes(config, fewer_layers, make_notes(2), tmp_path / "b")
    with pytest.raises(ValueError, match="multiple of the 8 devices"):
        embed_notes(tiny_config(tmp_path, "embed.batch_size=12"), export, make_notes(2), tmp_path / "c")


def test_bucket_lengths():
    assert bucket_lengths(256, 4) == [64, 128, 192, 256]
    assert bucket_lengths(160, 3) == [56, 112, 160]
    assert bucket_lengths(100, 1) == [104]  # the longest bucket always covers max_length


def test_frozen_bottom_export_embeds_through_the_shared_feature_cache(tmp_path):
    """An export trained with the top 2 layers reads the frozen bottom from the on-disk FeatureCache: same
    vectors as the full forward pass, and a second variant sharing that bottom uses the same cache (its
folder of appended parts gets no new one: every sequence is a hit)."""
    config = tiny_config(tmp_path, "model.train_top_layers=2")
    tokenizer = resolve_tokenizer(config)
    params, llama_cfg = load_initial_params(config, tokenizer.vocab_size)
    export_path = save_notellm(tmp_path / "export", params, llama_cfg, config)
    export = load_notellm(export_path)
    assert export.meta["train_top_layers"] == 2
    notes = make_notes(9)
    mesh = make_mesh(1, -1, 1)
    out = embed_notes(config, export_path, notes, tmp_path / "emb1", mesh=mesh)
    cache_files = list((config.data_dir / "feature_cache").glob("*/part-*.npz"))  # one cache, one part
    assert len(cache_files) == 1
    expected = np.stack([direct_embedding(export, tokenizer, n) for n in notes])
    np.testing.assert_allclose(read_embeddings(out)[1], expected, atol=2e-5)

    # A second variant: same frozen bottom (same fingerprint, same file), a different projection on top.
    other = jax.tree.map(np.asarray, params)
    other["proj"]["kernel"] = other["proj"]["kernel"][:, ::-1].copy()
    other_path = save_notellm(tmp_path / "export2", other, llama_cfg, config)
    out2 = embed_notes(config, other_path, notes, tmp_path / "emb2", mesh=mesh)
    expected2 = np.stack([direct_embedding(load_notellm(other_path), tokenizer, n) for n in notes])
    np.testing.assert_allclose(read_embeddings(out2)[1], expected2, atol=2e-5)
    assert list((config.data_dir / "feature_cache").glob("*/part-*.npz")) == cache_files  # all hits: no new part


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_prefix_cache_gives_the_full_prompt_embeddings(export_dir, tmp_path, padding_side):
    """The instruction's key/value cache computed once + each note's own tokens on top = the whole prompt run
    at once (fp32), for titles whose first character could merge with the template's last token."""
    from notellm_jax.config import override
    from notellm_jax.infer.encoder import note_encoder
    from notellm_jax.data.note_format import INSTRUCTION_HEAD

    config = tiny_config(tmp_path, f"prompt.padding_side={padding_side}", "embed.length_buckets=2")
    cached = note_encoder(config, export_dir, make_mesh(1, -1, 1))
    full = note_encoder(override(config, {"embed.prefix_cache": False}), export_dir, make_mesh(1, -1, 1))
    assert not full.prefix and cached.tokenizer.decode(cached.prefix).startswith(INSTRUCTION_HEAD.strip())
    assert cached.buckets[-1] == bucket_lengths(cached.prompt.max_length - len(cached.prefix), 2)[-1]
    titles = ["s is for sour", "'quoted'", "(brackets)", "été", "", "9 grams", "x" * 300]
    notes = [Note(f"n{i}", t, " ".join(WORDS[:i * 2]), ["t"], "coffee") for i, t in enumerate(titles)]
    for note in notes:  # the cached path feeds exactly the whole prompt's tail
        assert cached.prefix + cached.tokens(note) == full.tokens(note)
    np.testing.assert_allclose(cached.embedder([cached.tokens(n) for n in notes]),
                               full.embedder([full.tokens(n) for n in notes]), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_token_budget_batches_equal_the_fixed_rows(export_dir, tmp_path):
    """embed.batch_tokens: batches cut to rows x padded length <= the budget, filler rows only in the first one
    (the shortest notes), lengths on a 16-token step, fewer positions than the fixed rows; the vectors equal
    the fixed-row embedder's and the one-note forward pass."""
    from notellm_jax.config import override
    from notellm_jax.infer.encoder import TOKEN_STEP, note_encoder

    config = tiny_config(tmp_path, "embed.batch_tokens=3000")
    mesh = make_mesh(1, -1, 1)  # 8 batch devices: rows are multiples of 8
    budget = note_encoder(config, export_dir, mesh)
    fixed = note_encoder(override(config, {"embed.batch_tokens": 0}), export_dir, mesh)
    lengths = [int(n) for n in np.random.default_rng(0).integers(5, budget.buckets[-1], 100)]
    calls = budget.embedder.plan(lengths)
    assert sorted(i for members, _, _ in calls for i in members) == list(range(100))
    for k, (members, rows, length) in enumerate(calls):
        assert rows % 8 == 0 and length % TOKEN_STEP == 0 and rows * length <= 3000
        assert length - TOKEN_STEP < max(lengths[i] for i in members) <= length
        assert len(members) == rows or (k == 0 and len(members) > rows // 2)
    per_note = lambda plan: sum(rows * length for _, rows, length in plan) / len(lengths)  # noqa: E731
    assert per_note(calls) < per_note(fixed.embedder.plan(lengths))

    notes = make_notes(9)
    tokens = [budget.tokens(n) for n in notes]
    assert tokens == [fixed.tokens(n) for n in notes]
    vectors = budget.embedder(tokens)
    np.testing.assert_allclose(vectors, fixed.embedder(tokens), atol=2e-6, rtol=0)
    expected = np.stack([direct_embedding(budget.export, budget.tokenizer, n) for n in notes])
    np.testing.assert_allclose(vectors, expected, atol=2e-5)


@pytest.mark.slow
def test_prefix_cache_on_the_frozen_bottom_feature_cache(tmp_path):
    """A top-k export's feature-cache path with the prompt prefix cached: the bottom and the top run each note's
    own tokens on the prefix's keys and values; same vectors as without the prefix and as the one-note forward
    pass; both kinds of features live in one store under different keys, and a second pass is all hits."""
    from notellm_jax.config import override
    from notellm_jax.infer.encoder import note_encoder

    config = tiny_config(tmp_path, "model.train_top_layers=2", "embed.length_buckets=2")
    tokenizer = resolve_tokenizer(config)
    params, llama_cfg = load_initial_params(config, tokenizer.vocab_size)
    export_path = save_notellm(tmp_path / "export", params, llama_cfg, config)
    mesh = make_mesh(1, -1, 1)
    full = note_encoder(override(config, {"embed.prefix_cache": False}), export_path, mesh)
    cached = note_encoder(config, export_path, mesh)
    assert full.cache is not None and cached.cache is not None and cached.prefix and not full.prefix
    notes = make_notes(9)
    for note in notes:
        assert cached.prefix + cached.tokens(note) == full.tokens(note)
    without = full.embedder([full.tokens(n) for n in notes])
    with_prefix = cached.embedder([cached.tokens(n) for n in notes])
    np.testing.assert_allclose(with_prefix, without, atol=2e-6, rtol=0)
    expected = np.stack([direct_embedding(cached.export, tokenizer, n) for n in notes])
    np.testing.assert_allclose(with_prefix, expected, atol=2e-5)
    # the stored features are the notes' own tokens only (after the prefix)
    assert cached.cache.size_bytes < full.cache.size_bytes
    misses, hits = cached.cache.misses, cached.cache.hits
    np.testing.assert_array_equal(cached.embedder([cached.tokens(n) for n in notes]), with_prefix)
    rows = sum(rows for _, rows, _ in cached.embedder.plan([len(cached.tokens(n)) for n in notes]))  # fillers too
    assert (cached.cache.misses, cached.cache.hits - hits) == (misses, rows)


def test_prefix_cache_stays_off_for_a_pooled_export(tmp_path):
    """A mean-pooled export reads every row of the prompt, the prefix's too: no prefix cache, whole prompts."""
    from notellm_jax.infer.encoder import note_encoder

    config = tiny_config(tmp_path, "model.pooling=mean", "embed.length_buckets=2")
    tokenizer = resolve_tokenizer(config)
    params, llama_cfg = load_initial_params(config, tokenizer.vocab_size)
    export_path = save_notellm(tmp_path / "export", params, llama_cfg, config)
    encoder = note_encoder(config, export_path, make_mesh(1, -1, 1))
    assert encoder.prefix == [] and encoder.export.meta["levers"]["pooling"] == "mean"
    notes = make_notes(3)
    example = build_example(notes[0], tokenizer, encoder.prompt, "category", with_output=False)
    assert encoder.tokens(notes[0]) == example.input_ids[:example.embed_read_pos + 1]
