"""TFRecord shards + tf.data pair pipeline on a tiny synthetic note store (stories260K tokenizer)."""
import collections

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from notellm_jax.config import Config, override
from notellm_jax.data.input_pipeline import make_train_dataset, steps_per_epoch
from notellm_jax.data.shards import write_shards
from notellm_jax.weights.tokenizer import load_tokenizer

N_NOTES, N_PAIRS = 20, 24
WORDS = ["ball", "park", "cat", "dog", "sun", "tree", "boat", "cake"]


def make_config(stories_dir, **prompt):
    # The reference layout's short prompts keep the test fast.
    return override(Config(), {"model.tokenizer": str(stories_dir / "tok512.model"), "prompt.layout": "reference",
                               "prompt.max_length": 128, "prompt.max_targets": 16, "prompt.hashtag_fraction": 0.4,
                               "train.batch_pairs": 4, "data.num_shards": 4,
                               **{f"prompt.{key}": value for key, value in prompt.items()}})


@pytest.fixture(scope="module")
def store(tmp_path_factory, stories_dir):
    data_dir = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    notes = [{"note_id": f"q{i}", "title": f"The {WORDS[i % 8]} story {i}", "content": f"Lily saw a {WORDS[i % 5]}.",
              "topics": [] if i == 7 else [WORDS[(i + k) % 8] for k in range(2 + i % 3)],
              "category": f"site{i % 3}", "created_at": i, "exposure": 10 * i} for i in range(N_NOTES)]
    pq.write_table(pa.Table.from_pylist(notes), data_dir / "notes.parquet")
    pairs = [(int(a), int(b)) for a, b in rng.integers(0, N_NOTES, size=(N_PAIRS, 2))]
    rows = [{"note_a": f"q{a}", "note_b": f"q{b}", "score": 1.0} for a, b in pairs]
    rows.append({"note_a": "q1", "note_b": "missing", "score": 1.0})
    pq.write_table(pa.Table.from_pylist(rows), data_dir / "pairs_train.parquet")
    config = make_config(stories_dir)
    counts = write_shards(config, data_dir)
    return data_dir, config, notes, pairs, counts


def take(config, data_dir, n, **kw):
    it = make_train_dataset(config, data_dir, **kw)
    return [next(it) for _ in range(n)]


def test_counts(store):
    _, _, _, _, counts = store
    assert counts["train_pairs_written"] == N_PAIRS
    assert counts["train_pairs_dropped_unknown_note"] == 1
    assert counts["hashtag_rejected_no_topics"] == 1


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_layout_shapes_and_targets(store, stories_dir, padding_side):
    data_dir, config, notes, pairs, _ = store
    config = make_config(stories_dir, padding_side=padding_side)
    tok = load_tokenizer(config.model.tokenizer)
    b, length, m = 2, 128, 16
    for batch in take(config, data_dir, 3, process_index=1, process_count=2):
        assert batch["input_ids"].shape == (2 * b, length) and batch["input_ids"].dtype == np.int32
        assert batch["target_ids"].shape == (2 * b, m) and batch["target_mask"].dtype == np.float32
        assert batch["note_index"].dtype == np.int64
        assert list(batch["pair_id"]) == [2, 3, 2, 3]   # process_index * b + i, at rows i and b + i
        for i in range(b):
            assert (int(batch["note_index"][i]), int(batch["note_index"][b + i])) in pairs
        assert batch["task"].sum() == 2                   # round(0.4 * 4)
        for row in range(2 * b):
            ids, note = batch["input_ids"][row], notes[batch["note_index"][row]]
            assert ids[batch["embed_read_pos"][row] + 1] == tok.emb_id
            assert (batch["attention_mask"][row, 0] == 1) == (padding_side == "right")
            mask = batch["target_mask"][row] == 1
            assert list(ids[batch["target_positions"][row][mask] + 1]) == list(batch["target_ids"][row][mask])
            text = tok.decode(batch["target_ids"][row][mask], skip_special_tokens=False).strip()
            assert text.endswith("</s>")
            if batch["task"][row] == 0:
                assert text == note["category"] + "</s>"
            else:
                assert set(text[:-4].split(", ")) <= set(note["topics"])


def test_every_pair_once_per_epoch_across_two_hosts(store):
    data_dir, config, _, pairs, _ = store
    steps = steps_per_epoch(config, data_dir, process_count=2)
    assert steps == N_PAIRS // 4
    epochs = [collections.Counter(), collections.Counter()]
    for host in range(2):
        for step, batch in enumerate(take(config, data_dir, 2 * steps, process_index=host, process_count=2)):
            for i in range(2):
                epochs[step // steps][(int(batch["note_index"][i]), int(batch["note_index"][2 + i]))] += 1
    assert epochs[0] == collections.Counter(pairs) == epochs[1]


def test_reshuffles_each_epoch_and_resumes_exactly(store):
    data_dir, config, _, _, _ = store
    steps = steps_per_epoch(config, data_dir, process_count=1)
    full = take(config, data_dir, 2 * steps + 2, process_index=0, process_count=1)
    order = [list(batch["note_index"]) for batch in full]
    assert order[:steps] != order[steps:2 * steps]
    for start in (2, steps - 1, steps + 1):
        resumed = take(config, data_dir, 3, process_index=0, process_count=1, start_step=start)
        for got, want in zip(resumed, full[start:start + 3]):
            assert got.keys() == want.keys()
            for key in got:
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"start {start} {key}")


def test_stale_shards_and_bad_batch_rejected(store, stories_dir):
    data_dir, _, _, _, _ = store
    with pytest.raises(ValueError, match="rerun write_shards"):
        next(make_train_dataset(make_config(stories_dir, max_length=160), data_dir, process_index=0, process_count=1))
    config = override(make_config(stories_dir), {"train.batch_pairs": 3})
    with pytest.raises(ValueError, match="multiple of process_count"):
        next(make_train_dataset(config, data_dir, process_index=0, process_count=2))


def test_record_sharding_when_files_do_not_divide_hosts(store, stories_dir, tmp_path):
    data_dir, _, _, pairs, _ = store
    for name in ("notes.parquet", "pairs_train.parquet"):
        (tmp_path / name).write_bytes((data_dir / name).read_bytes())
    config = override(make_config(stories_dir), {"data.num_shards": 3})  # 3 files over 2 hosts: ds.shard over records
    write_shards(config, tmp_path)
    steps = steps_per_epoch(config, tmp_path, process_count=2)
    seen = collections.Counter()
    for host in range(2):
        for batch in take(config, tmp_path, steps, process_index=host, process_count=2):
            for i in range(2):
                seen[(int(batch["note_index"][i]), int(batch["note_index"][2 + i]))] += 1
    assert steps == N_PAIRS // 4 and seen == collections.Counter(pairs)
