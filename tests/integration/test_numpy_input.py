"""The numpy training input (shards/tokens.npz) gives the TFRecord pipeline's batches, without TensorFlow."""
import collections
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from notellm_jax.config import Config, override
from notellm_jax.data.input_pipeline import (_assemble, _token_batch, make_numpy_train_dataset, make_train_dataset,
                                             steps_per_epoch)
from notellm_jax.data.shards import TOKEN_ARRAYS, read_shards_meta, write_shards
from notellm_jax.weights.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
SETTINGS = {"prompt.layout": "reference", "prompt.max_length": 128, "prompt.max_targets": 16, "train.batch_pairs": 4,
            "data.num_shards": 2}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, stories_dir):
    data_dir = tmp_path_factory.mktemp("data")
    words = ["ball", "park", "cat", "dog", "sun", "tree"]
    notes = [{"note_id": f"q{i}", "title": f"The {words[i % 6]} story {i}", "content": f"Lily saw a {words[i % 5]}.",
              "topics": [] if i == 3 else [words[(i + k) % 6] for k in range(1 + i % 3)],
              "category": f"site{i % 3}", "created_at": i, "exposure": i} for i in range(12)]
    pq.write_table(pa.Table.from_pylist(notes), data_dir / "notes.parquet")
    pairs = np.random.default_rng(0).integers(0, 12, size=(14, 2))
    pq.write_table(pa.Table.from_pylist([{"note_a": f"q{a}", "note_b": f"q{b}", "score": 1.0} for a, b in pairs]),
                   data_dir / "pairs_train.parquet")
    config = override(Config(), SETTINGS | {"model.tokenizer": str(stories_dir / "tok512.model")})
    write_shards(config, data_dir)
    return config, data_dir


def test_numpy_batch_equals_tfrecord_batch_for_the_same_pairs(prepared):
    config, data_dir = prepared
    meta = read_shards_meta(config, data_dir)
    with np.load(data_dir / "shards" / TOKEN_ARRAYS) as data:
        tokens = {k: data[k] for k in data.files}
    iterator = make_train_dataset(config, data_dir, process_index=0, process_count=1)
    for step in range(3):
        want = next(iterator)
        b = config.train.batch_pairs
        pairs = np.stack([want["note_index"][:b], want["note_index"][b:]], axis=1)
        got = _assemble(_token_batch(tokens, pairs), config, meta, step, 0, b)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_numpy_epochs_cover_every_pair_once_and_resume(prepared):
    config, data_dir = prepared
    steps = steps_per_epoch(config, data_dir)
    with np.load(data_dir / "shards" / TOKEN_ARRAYS) as data:
        all_pairs = collections.Counter(map(tuple, data["train_pairs"].tolist()))
    iterator = make_numpy_train_dataset(config, data_dir)
    batches = [next(iterator) for _ in range(2 * steps)]
    b = config.train.batch_pairs
    for epoch in range(2):
        seen = collections.Counter((int(x["note_index"][i]), int(x["note_index"][b + i]))
                                   for x in batches[epoch * steps:(epoch + 1) * steps] for i in range(b))
        assert sum(seen.values()) == steps * b and not seen - all_pairs  # a subset of the pairs, each at most as often
    resumed = next(make_numpy_train_dataset(config, data_dir, start_step=steps + 1))
    for key in resumed:
        np.testing.assert_array_equal(resumed[key], batches[steps + 1][key], err_msg=key)


def test_numpy_input_imports_no_tensorflow(prepared):
    config, data_dir = prepared
    settings = SETTINGS | {"model.tokenizer": config.model.tokenizer}
    code = (f"import sys; sys.modules['tensorflow'] = None\n"
            f"from notellm_jax.config import Config, override\n"
            f"from notellm_jax.data.input_pipeline import make_numpy_train_dataset\n"
            f"c = override(Config(), {settings!r})\n"
            f"batch = next(make_numpy_train_dataset(c, {str(data_dir)!r}))\n"
            f"print(batch['input_ids'].shape)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "(8, 128)"


def test_batch_by_category_gives_same_category_batches_covering_every_pair(prepared):
    """train.batch_by_category: the categories of each batch's first notes, read back from notes.parquet,
    are one category per whole-category batch; an epoch still uses every pair at most once, for the same
    number of steps; validation batches are not regrouped."""
    config, data_dir = prepared
    grouped = override(config, {"train.batch_by_category": True, "data.train_input": "numpy"})
    grouped.validate(1, training=True)
    with np.load(data_dir / "shards" / TOKEN_ARRAYS) as data:
        note_ids = data["note_id"]
    category = {f"q{i}": f"site{i % 3}" for i in range(12)}
    steps = steps_per_epoch(grouped, data_dir)
    iterator = make_numpy_train_dataset(grouped, data_dir)
    b = config.train.batch_pairs
    seen, single = [], 0
    for _ in range(steps):
        batch = next(iterator)
        firsts = {category[str(note_ids[i])] for i in batch["note_index"][:b]}
        single += len(firsts) == 1
        seen.extend(zip(batch["note_index"][:b].tolist(), batch["note_index"][b:].tolist()))
    assert single >= 1 and len(seen) == steps * b
    assert not collections.Counter(seen) - collections.Counter(map(tuple, data_pairs(data_dir)))


def data_pairs(data_dir):
    with np.load(data_dir / "shards" / TOKEN_ARRAYS) as data:
        return data["train_pairs"].tolist()


def test_self_positive_pairs_are_a_notes_title_and_its_own_content(prepared, stories_dir):
    """train.self_positive_weight 0.5 with 4 pairs: 2 pairs of a training batch become (title only, content
    only) prompts of one note, both rows with its index; read back as text, the title view holds the title and
    an empty content, the content view the reverse; the other pairs are those of the plain batch (their tasks may
differ: the views take no hashtag task, which changes the hashtag draw)."""
    config, data_dir = prepared
    mixed = override(config, {"train.self_positive_weight": 0.5, "data.train_input": "numpy"})
    mixed.validate(1, training=True)
    tokenizer = load_tokenizer(stories_dir / "tok512.model", config.prompt.emb_token)
    titles = {f"q{i}": f"The {['ball', 'park', 'cat', 'dog', 'sun', 'tree'][i % 6]} story {i}" for i in range(12)}
    with np.load(data_dir / "shards" / TOKEN_ARRAYS) as data:
        note_ids = data["note_id"]
    plain, batch = next(make_numpy_train_dataset(config, data_dir)), next(make_numpy_train_dataset(mixed, data_dir))
    b = config.train.batch_pairs
    text = lambda row: tokenizer.decode(batch["input_ids"][row][batch["attention_mask"][row] > 0].tolist())  # noqa: E731
    replaced = [row for row in range(b) if "'content': ''" in text(row)]  # every fixture note has a content
    assert len(replaced) == 2
    for row in replaced:
        assert batch["note_index"][row] == batch["note_index"][b + row] == plain["note_index"][row]
        title = titles[str(note_ids[batch["note_index"][row]])]
        assert title in text(row) and "'content': ''" in text(row)
        assert "'title': ''" in text(b + row) and title not in text(b + row) and "Lily saw" in text(b + row)
    kept = [row for row in range(b) if row not in replaced]
    np.testing.assert_array_equal(batch["note_index"][kept], plain["note_index"][kept])
    np.testing.assert_array_equal(batch["note_index"][[b + row for row in kept]],
                                  plain["note_index"][[b + row for row in kept]])
