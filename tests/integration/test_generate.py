"""Generation tool: KV-cache greedy decoding against full recomputation (numpy penalty and trie references),
constrained category decoding, metric wiring by hand, bad input. stories260K weights, synthetic notes."""
import json

import jax
import numpy as np
import pytest

from notellm_jax.weights.formats import load_causal_lm
from notellm_jax.config import Config, override
from notellm_jax.data.prompts import Note, build_example
from notellm_jax.data.store import write_notes
from notellm_jax.eval.generation import generate_and_score, generate_task, generation_notes, score_generations
from notellm_jax.infer.generator import Generator, category_trie, generation_prompt
from notellm_jax.model.decode import NO_CHILD, TokenTrie, greedy_decode
from notellm_jax.weights.export import save_notellm
from notellm_jax.weights.tokenizer import load_tokenizer
from notellm_jax.weights.loading import load_initial_params

# Categories whose token sequences share prefixes (tok512: "coffee" is a token prefix of "coffee beans"
# and "coffeehouse", "co" of all three; "beer" of "beer brewing"; "tea" of "tea-time").
CATEGORIES = ["coffee", "coffee beans", "coffeehouse", "co", "beer", "beer brewing", "tea", "tea-time"]
WORDS = ["ball", "park", "cat", "dog", "sun", "tree", "boat", "cake", "milk", "bird", "rain"]
N_TRAIN, N_TEST = 16, 40


def _note(i: int, category: str) -> dict:
    words = [WORDS[(i * k + 3) % len(WORDS)] for k in range(1, 4)]
    return {"note_id": f"n{i}", "title": f"The {words[0]} and the {words[1]}",
            "content": f"Lily saw a {words[2]} near the {WORDS[i % len(WORDS)]}. It was {i} years old.",
            "topics": [] if i % 7 == 3 else words[:1 + i % 3], "category": category, "created_at": i,
            "exposure": i}


def _as_note(row: dict) -> Note:
    return Note(row["note_id"], row["title"], row["content"], list(row["topics"]), row["category"])


def make_config(work_dir, stories_dir, shared_dir) -> Config:
    return override(Config(name="gen-test"), {
        "paths.work_dir": str(work_dir), "paths.shared_dir": str(shared_dir),
        "model.checkpoint": str(stories_dir / "stories260K.bin"), "model.tokenizer": str(stories_dir / "tok512.model"),
        "model.emb_dim": 8, "prompt.max_length": 192, "generation.batch_size": 16, "generation.max_new_tokens": 12})


@pytest.fixture(scope="module")
def run(tmp_path_factory, stories_dir, shared_dir):
    """A work dir with notes.parquet + split.json and an export of stories260K with the [EMB] row."""
    work = tmp_path_factory.mktemp("gen_run")
    config = make_config(work, stories_dir, shared_dir)
    notes = [_note(i, CATEGORIES[i % len(CATEGORIES)]) for i in range(N_TRAIN + N_TEST)]
    notes[-1]["category"] = "wine"  # a test note whose category no training note has
    write_notes(notes, work / "data" / "notes.parquet")
    split = {"train_notes": [n["note_id"] for n in notes[:N_TRAIN]],
             "test_notes": [n["note_id"] for n in notes[N_TRAIN:]]}
    (work / "data" / "split.json").write_text(json.dumps(split))
    tokenizer_path = config.model.tokenizer
    vocab = load_tokenizer(tokenizer_path).vocab_size
    params, llama_cfg = load_initial_params(config, vocab)
    save_notellm(work / "export", params, llama_cfg, config)
    # A random model with weights 10x the usual init scale (N(0, 0.2)): its outputs depend strongly on
    # the prompt, so constrained decoding walks many different trie branches.
    rng = np.random.default_rng(0)
    params["decoder"] = jax.tree.map(lambda x: rng.normal(0, 0.2, x.shape).astype(np.float32) if x.ndim > 1 else x,
                                     params["decoder"])
    save_notellm(work / "export_random", params, llama_cfg, config)
    return config, notes


@pytest.fixture(scope="module")
def stories_lm(stories_dir):
    return load_causal_lm(stories_dir / "stories260K.bin")


# ------------------------------------------------------------------------------------------------
# Token trie


def _trie_paths(trie: TokenTrie, state: int = 0, prefix: tuple = ()) -> set[tuple]:
    kids = [(int(t), int(s)) for t, s in zip(trie.tokens[state], trie.next_state[state]) if t != NO_CHILD]
    if not kids:
        return {prefix}
    return set().union(*(_trie_paths(trie, s, prefix + (t,)) for t, s in kids))


def test_trie_holds_exactly_its_sequences():
    rng = np.random.default_rng(0)
    end = 2
    stems = [list(rng.integers(3, 9, size=rng.integers(1, 5))) for _ in range(30)]
    sequences = {tuple(s) + (end,) for s in stems} | {tuple(stems[0][:1]) + (end,)}  # a prefix of another
    trie = TokenTrie.build(sequences, end)
    assert _trie_paths(trie) == sequences
    assert trie.depth == max(map(len, sequences))
    with pytest.raises(ValueError, match="must end with the end token"):
        TokenTrie.build([[5, 6]], end)
    with pytest.raises(ValueError, match="only there"):
        TokenTrie.build([[5, end, 6, end]], end)
    with pytest.raises(ValueError, match="at least one"):
        TokenTrie.build([], end)


# ------------------------------------------------------------------------------------------------
# Decoding against step-by-step full recomputation


def _reference_decode(lm, prompt: list[int], n_new: int, eos: int, penalty: float, sequences=None,
                      width: int = 64) -> list[int]:
    """Greedy decoding without a cache: full-sequence logits every step, penalty and trie in numpy."""
    tokens, new = list(prompt), []
    for _ in range(n_new):
        ids = np.zeros((1, width), np.int32)
        ids[0, :len(tokens)] = tokens
        mask = (np.arange(width) < len(tokens)).astype(np.int32)[None]
        logits = lm.logits(ids, mask)[0, len(tokens) - 1].astype(np.float64)
        for t in set(new):  # HF arithmetic on already generated tokens
            logits[t] = logits[t] * penalty if logits[t] < 0 else logits[t] / penalty
        if sequences is not None:
            allowed = {s[len(new)] for s in sequences if list(s[:len(new)]) == new and len(s) > len(new)}
            logits[[t for t in range(len(logits)) if t not in allowed]] = -np.inf
        token = int(logits.argmax())
        tokens.append(token)
        new.append(token)
        if token == eos:
            break
    return new + [eos] * (n_new - len(new))


def _left_padded(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    length = max(map(len, prompts))
    ids, mask = np.zeros((len(prompts), length), np.int32), np.zeros((len(prompts), length), np.int32)
    for row, p in enumerate(prompts):
        ids[row, length - len(p):], mask[row, length - len(p):] = p, 1
    return ids, mask


@pytest.fixture(scope="module")
def story_prompts(stories_dir):
    tok = load_tokenizer(stories_dir / "tok512.model")
    return [[1] + tok.encode(text) for text in ("Tom had a big dog. The dog", "The sun", "Once upon a time, Lily")]


@pytest.mark.parametrize("penalty", [1.0, 1.8])
def test_greedy_equals_full_recomputation_with_left_padding(stories_lm, story_prompts, penalty):
    n_new, eos = 24, stories_lm.config.eos_token_id
    ids, mask = _left_padded(story_prompts)
    got = greedy_decode(stories_lm.model, stories_lm.params, ids, mask, n_new, eos, penalty)
    expected = [_reference_decode(stories_lm, p, n_new, eos, penalty) for p in story_prompts]
    assert got.tolist() == expected
    if penalty != 1.0:  # the penalty must have changed something, or this case tests nothing
        plain = greedy_decode(stories_lm.model, stories_lm.params, ids, mask, n_new, eos)
        assert (plain != got).any()


def test_trie_constrained_decoding_equals_masked_recomputation(stories_lm, story_prompts):
    eos = stories_lm.config.eos_token_id
    # Shared prefixes, a sequence that is a prefix of another, and tokens the model would not pick.
    sequences = [(280, 414, eos), (280, 414, 431, 411, eos), (280, 300, eos), (329, 285, 268, eos), (77, eos)]
    trie = TokenTrie.build(sequences, eos)
    ids, mask = _left_padded(story_prompts)
    for penalty in (1.0, 1.8):
        got = greedy_decode(stories_lm.model, stories_lm.params, ids, mask, 6, eos, penalty, trie)
        expected = [_reference_decode(stories_lm, p, 6, eos, penalty, sequences) for p in story_prompts]
        assert got.tolist() == expected
        assert all(tuple(row[:row.index(eos) + 1]) in sequences for row in got.tolist())
    with pytest.raises(ValueError, match="shorter than the longest constrained"):
        greedy_decode(stories_lm.model, stories_lm.params, ids, mask, 4, eos, 1.0, trie)
    with pytest.raises(ValueError, match="repetition_penalty must be > 0"):
        greedy_decode(stories_lm.model, stories_lm.params, ids, mask, 4, eos, 0.0)


# ------------------------------------------------------------------------------------------------
# Constrained category decoding on many notes


def test_constrained_categories_never_leave_the_closed_set(run):
    config, notes = run
    gen = Generator(config, config.work_dir / "export_random")
    many = [_as_note(n) for n in notes]
    free, _ = generate_task(gen, many, "category", config)
    assert sum(r["text"] not in CATEGORIES for r in free) > len(many) // 2  # unconstrained, it invents text
    trie = category_trie(CATEGORIES, gen.tokenizer, gen.prompt)
    records, skipped = generate_task(gen, many, "category", config, trie)
    texts = [r["text"] for r in records]
    assert skipped == 0 and len(texts) == len(many)
    assert set(texts) <= set(CATEGORIES) and all(r["finished"] for r in records)
    # Many branches are exercised, including both ends of shared token prefixes ("tea" / "tea-time").
    assert len(set(texts)) >= 4
    assert any(a != b and b.startswith(a) for a in texts for b in texts)


def test_category_trie_uses_the_training_output_tokens(run):
    config, notes = run
    gen = Generator(config, config.work_dir / "export")
    trie = category_trie(CATEGORIES, gen.tokenizer, gen.prompt)
    expected = {tuple(build_example(_as_note(n), gen.tokenizer, gen.prompt, "category").target_ids)
                for n in notes[:N_TRAIN]}
    assert _trie_paths(trie) == expected


# ------------------------------------------------------------------------------------------------
# End to end, metric wiring and bad input


def test_generate_and_score_end_to_end(run, tmp_path):
    config, notes = run
    result = generate_and_score(config, config.work_dir / "export", tmp_path, constrain=True, limit=N_TEST)
    records = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    test_notes = notes[N_TRAIN:]
    no_tags = sum(not n["topics"] for n in test_notes)
    assert result["without_prompt"] == {"category": 0, "hashtag": no_tags}
    assert [r["task"] for r in records] == ["category"] * N_TEST + ["hashtag"] * (N_TEST - no_tags)
    assert [r["note_id"] for r in records[:N_TEST]] == [n["note_id"] for n in test_notes]
    assert {r["gold"] for r in records if r["task"] == "category"} <= set(CATEGORIES) | {"wine"}
    assert records[N_TEST]["gold"] == ", ".join(next(n["topics"] for n in test_notes if n["topics"]))
    assert result["category"]["gold_outside_closed_set"] == 1 and result["category"]["notes"] == N_TEST - 1
    assert result["category"]["illusory"] == 0.0
    assert json.loads((tmp_path / "metrics.json").read_text()) == result
    rescored = score_generations(records, CATEGORIES)
    assert rescored["hashtag"] == result["hashtag"] and rescored["category"] == result["category"]


def test_hashtag_prompt_asks_for_at_most_max_topics_without_showing_them(run):
    config, notes = run
    gen = Generator(config, config.work_dir / "export")
    tags = ["alpha", "beta", "gamma", "delta", "epsilon"]
    for n_tags in (2, 5):
        note = Note("t", "A ball", "Lily saw a cat.", tags[:n_tags], "tea")
        text = gen.tokenizer.decode(generation_prompt(note, "hashtag", gen.tokenizer, gen.prompt).input_ids)
        assert text.endswith(f"The {min(n_tags, gen.prompt.max_topics)} topics are:"), text
        assert not any(tag in text for tag in tags) and "'topic'" not in text
    assert generation_prompt(Note("t", "A ball", "", [], "tea"), "hashtag", gen.tokenizer, gen.prompt) is None


def test_score_generations_by_hand():
    records = [
        {"task": "category", "text": "Coffee", "gold": "coffee", "finished": True},   # right
        {"task": "category", "text": "tea", "gold": "beer", "finished": True},        # wrong, in the set
        {"task": "category", "text": "juice", "gold": "coffee", "finished": False},   # illusory
        {"task": "category", "text": "tea", "gold": "wine", "finished": True},        # gold not in the set
        {"task": "hashtag", "text": "espresso, grinder", "gold": "espresso, milk", "finished": True},
        {"task": "hashtag", "text": "#beer #ale ale", "gold": "ale", "finished": False},
    ]
    scores = score_generations(records, ["beer", "coffee", "tea"])
    assert scores["category"] == pytest.approx({"accuracy": 1 / 3, "illusory": 1 / 3, "notes": 3,
                                                "gold_outside_closed_set": 1, "closed_set_size": 3,
                                                "unfinished": 1})
    h = scores["hashtag"]
    # note 1: P = R = 1/2; note 2: tags {beer, ale} vs {ale}: P = 1/2, R = 1, F1 = 2/3 (macro means)
    assert (h["precision"], h["recall"], h["f1"]) == pytest.approx((0.5, 0.75, (0.5 + 2 / 3) / 2))
    assert (h["notes"], h["unfinished"]) == (2, 1)
    # ROUGE-1 F1 on "espresso grinder"/"espresso milk" = 1/2 and "beer ale"/"ale" = 2/3
    assert h["rouge1"] == pytest.approx((0.5 + 2 / 3) / 2)
    # corpus BLEU: unigrams 2/4, bigrams 0/2 -> smoothed 1/(2*2); no trigrams (effective order 2); no brevity
    assert h["bleu4"] == pytest.approx(np.sqrt(0.5 * 0.25))
    with pytest.raises(ValueError, match="unknown task"):
        score_generations([{"task": "title", "text": "", "gold": "", "finished": True}], ["a"])


def test_limit_samples_across_the_split_not_its_first_notes(tmp_path, stories_dir, shared_dir):
    """split.json lists notes grouped by category (as prepare writes it): `limit` must not score one block."""
    config = make_config(tmp_path, stories_dir, shared_dir)
    blocks = ["coffee", "beer", "tea", "wine", "juice"]
    notes = [_note(i, blocks[i // 8]) for i in range(40)]
    write_notes(notes, tmp_path / "data" / "notes.parquet")
    test_ids = [n["note_id"] for n in notes]
    (tmp_path / "data" / "split.json").write_text(json.dumps({"train_notes": [], "test_notes": test_ids}))
    sample, _ = generation_notes(config, "test", limit=8)  # the first 8 notes are all "coffee"
    ids = [n.note_id for n in sample]
    assert len(set(ids)) == 8 and set(ids) <= set(test_ids)
    assert ids == sorted(ids, key=test_ids.index)  # kept in split.json order
    assert len({n.category for n in sample}) >= 3
    assert [n.note_id for n in generation_notes(config, "test", limit=8)[0]] == ids  # seeded: the same sample
    other = override(config, {"data.seed": config.data.seed + 1})
    assert [n.note_id for n in generation_notes(other, "test", limit=8)[0]] != ids
    for limit in (None, 40, 100):
        assert [n.note_id for n in generation_notes(config, "test", limit=limit)[0]] == test_ids


def test_bad_input(run, tmp_path, stories_dir, shared_dir):
    config, _ = run
    export = config.work_dir / "export"
    with pytest.raises(ValueError, match="tasks must be"):
        generate_and_score(config, export, tmp_path, tasks=("title",))
    with pytest.raises(ValueError, match="split must be"):
        generate_and_score(config, export, tmp_path, split="val")
    with pytest.raises(ValueError, match="limit must be"):
        generate_and_score(config, export, tmp_path, limit=0)
    empty = make_config(tmp_path / "empty", stories_dir, shared_dir)
    (tmp_path / "empty" / "data").mkdir(parents=True)
    write_notes([_note(0, "tea")], tmp_path / "empty" / "data" / "notes.parquet")
    with pytest.raises(FileNotFoundError, match="split.json"):
        generate_and_score(empty, export, tmp_path)
    (tmp_path / "empty" / "data" / "split.json").write_text(json.dumps({"train_notes": ["n0"], "test_notes": []}))
    with pytest.raises(ValueError, match="the test split has no notes"):
        generate_and_score(empty, export, tmp_path)
    (tmp_path / "empty" / "data" / "split.json").write_text(json.dumps({"train_notes": ["n0"], "test_notes": ["x"]}))
    with pytest.raises(ValueError, match="not in notes.parquet"):
        generate_and_score(empty, export, tmp_path)
    # An export whose embedding table lacks the [EMB] row does not belong to the tokenizer.
    params, llama_cfg = load_initial_params(config, None)
    save_notellm(tmp_path / "other", params, llama_cfg, config)
    with pytest.raises(ValueError, match="do not belong together"):
        Generator(config, tmp_path / "other")
