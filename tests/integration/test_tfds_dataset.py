"""The notellm_prepared TFDS dataset (built on the in-process Beam runner) holds the shards' records,
and training input read from it gives exactly the batches read from the shards (issue 13)."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from notellm_jax.config import Config, override
from notellm_jax.data import prepare
from notellm_jax.data.input_pipeline import make_train_dataset

pytestmark = pytest.mark.slow
N_NOTES, N_PAIRS = 16, 30
WORDS = ["ball", "park", "cat", "dog", "sun", "tree", "boat", "cake"]


@pytest.fixture(scope="module")
def built(tmp_path_factory, stories_dir):
    import tensorflow_datasets as tfds

    data_dir = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(1)
    notes = [{"note_id": f"q{i}", "title": f"The {WORDS[i % 8]} story {i}", "content": f"Lily saw a {WORDS[i % 5]}.",
              "topics": [] if i == 3 else [WORDS[(i + k) % 8] for k in range(1 + i % 3)],
              "category": f"site{i % 3}", "created_at": i, "exposure": 1} for i in range(N_NOTES)]
    pq.write_table(pa.Table.from_pylist(notes), data_dir / "notes.parquet")
    for split, n in (("train", N_PAIRS), ("val", 6)):
        pairs = rng.integers(0, N_NOTES, size=(n, 2))
        pq.write_table(pa.Table.from_pylist([{"note_a": f"q{a}", "note_b": f"q{b}", "score": 1.0} for a, b in pairs]),
                       data_dir / f"pairs_{split}.parquet")
    config = override(Config(), {
        "model.tokenizer": str(stories_dir / "tok512.model"), "prompt.layout": "reference", "prompt.max_length": 128,
        "prompt.max_targets": 16, "train.batch_pairs": 4, "data.num_shards": 4, "paths.data_dir": str(data_dir),
        })
    stats = prepare.prepare(override(config, {"data.train_input": "tfds"}), ["shards", "tfds"])
    return data_dir, config, stats, tfds


def test_as_dataset_loads_the_shard_records(built):
    data_dir, _, stats, tfds = built
    assert stats["tfds"]["pairs"] == {"train": N_PAIRS, "val": 6} and stats["tfds"]["notes"] == {"notes": N_NOTES}
    assert stats["tfds"]["pairs"]["train"] == stats["shards"]["train_pairs_written"]
    builder = tfds.builder("notellm_prepared/pairs", data_dir=str(data_dir / "tfds"))
    train = list(tfds.as_numpy(builder.as_dataset(split="train", shuffle_files=False)))
    assert len(train) == N_PAIRS and set(train[0]) >= {"a_note_index", "a_cat_ids", "b_hash_emb", "b_cat_prefix"}
    notes = list(tfds.as_numpy(tfds.builder("notellm_prepared/notes", data_dir=str(data_dir / "tfds"))
                               .as_dataset(split="notes", shuffle_files=False)))
    stored = pq.read_table(data_dir / "notes.parquet").to_pylist()
    assert [n["note_id"].decode() for n in notes] == [r["note_id"] for r in stored]
    assert [[t.decode() for t in n["topics"]] for n in notes] == [r["topics"] for r in stored]
    assert [n["created_at"] for n in notes] == [r["created_at"] for r in stored]
    assert builder.info.metadata["shards_meta"]["counts"]["train_pairs_written"] == N_PAIRS


@pytest.mark.parametrize("process_count,batch_pairs,start_step", [(1, 4, 9), (2, 4, 1), (3, 6, 0)])
def test_tfds_batches_equal_shard_batches(built, process_count, batch_pairs, start_step):
    """2 hosts: whole files per host; 3 hosts: 4 files do not divide, records are sharded."""
    data_dir, config, _, _ = built
    config = override(config, {"train.batch_pairs": batch_pairs})
    tfds_config = override(config, {"data.train_input": "tfds"})
    for host in range(process_count):
        kwargs = dict(process_index=host, process_count=process_count, start_step=start_step)
        shards, tfds_input = make_train_dataset(config, data_dir, **kwargs), make_train_dataset(tfds_config, data_dir, **kwargs)
        for _ in range(10):   # crosses epochs (7 or fewer steps per epoch)
            want, got = next(shards), next(tfds_input)
            assert got.keys() == want.keys()
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=key)
