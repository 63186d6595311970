"""store.notes_of, the one way to pick "which notes of a split": orders, samples, given ids, bad input.
A small store written here: notes.parquet in one order, split.json listing the splits in another."""
import json

import pytest

from notellm_jax.data import store
from notellm_jax.errors import StoreFormatError

CATEGORIES = ["coffee", "beer", "tea", "wine", "juice"]


@pytest.fixture
def data_dir(tmp_path):
    """40 notes n0..n39 in file order; split.json lists test n20..n39 backwards, train n0..n19 forwards."""
    notes = [{"note_id": f"n{i}", "title": f"t{i}", "content": f"c{i}", "topics": ["x"],
              "category": CATEGORIES[i // 8], "created_at": i, "exposure": 1} for i in range(40)]
    store.write_notes(notes, tmp_path / "notes.parquet")
    split = {"train_notes": [f"n{i}" for i in range(20)], "test_notes": [f"n{i}" for i in reversed(range(20, 40))]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    return tmp_path


def ids(notes):
    return [n.note_id for n in notes]


def test_orders(data_dir):
    test = [f"n{i}" for i in reversed(range(20, 40))]
    assert ids(store.notes_of(data_dir, "test")) == test  # split.json order by default
    assert ids(store.notes_of(data_dir, "test", order="file")) == sorted(test, key=lambda i: int(i[1:]))
    assert ids(store.notes_of(data_dir, "train")) == [f"n{i}" for i in range(20)]
    assert ids(store.notes_of(data_dir, "all")) == ids(store.notes_of(data_dir, "all", order="file")) \
        == [f"n{i}" for i in range(40)]
    notes = store.load_notes(data_dir / "notes.parquet")
    assert ids(store.notes_of(data_dir, "test", notes=notes)) == test  # notes.parquet already loaded
    assert store.notes_of(data_dir, "test")[0].category == "juice"


def test_given_ids_keep_their_order_or_the_files(data_dir):
    assert ids(store.notes_of(data_dir, ["n3", "n1", "n0", "n1"])) == ["n3", "n1", "n0"]
    assert ids(store.notes_of(data_dir, ["n3", "n1", "n0"], order="file")) == ["n0", "n1", "n3"]
    with pytest.raises(ValueError, match="not in notes.parquet: \\['nope'\\]"):
        store.notes_of(data_dir, ["n0", "nope"])


def test_sample_is_seeded_spread_and_kept_in_order(data_dir):
    train = ids(store.notes_of(data_dir, "train"))  # grouped by category: a prefix of 8 is one category
    sample = store.notes_of(data_dir, "train", sample=8, seed=0)
    assert len(set(ids(sample))) == 8 and ids(sample) == sorted(ids(sample), key=train.index)
    assert len({n.category for n in sample}) >= 2
    assert ids(store.notes_of(data_dir, "train", sample=8, seed=0)) == ids(sample)
    assert ids(store.notes_of(data_dir, "train", sample=8, seed=1)) != ids(sample)
    for sample_size in (None, 20, 100):
        assert ids(store.notes_of(data_dir, "train", sample=sample_size)) == train
    by_file = ids(store.notes_of(data_dir, "test", order="file", sample=5, seed=3))
    assert by_file == sorted(by_file, key=lambda i: int(i[1:]))


def test_bad_input(data_dir, tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        store.notes_of(data_dir, "val")
    with pytest.raises(ValueError, match="order must be one of"):
        store.notes_of(data_dir, "test", order="random")
    with pytest.raises(ValueError, match="sample must be >= 1"):
        store.notes_of(data_dir, "test", sample=0)
    split = json.loads((data_dir / "split.json").read_text())
    (data_dir / "split.json").write_text(json.dumps({**split, "test_notes": ["n20", "gone"]}))
    with pytest.raises(StoreFormatError, match="1 test note ids are not in notes.parquet"):
        store.notes_of(data_dir, "test")
    (data_dir / "split.json").write_text(json.dumps({"train_notes": []}))
    with pytest.raises(StoreFormatError, match="no test_notes list"):
        store.notes_of(data_dir, "test")
