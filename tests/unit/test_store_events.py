"""Event tables with a missing, mistyped or null key field are errors naming the file and row."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from notellm_jax.data import store


def test_read_events_rejects_nulls_with_row(tmp_path):
    path = tmp_path / "events.parquet"
    pq.write_table(pa.table({"user_id": ["u1", "u2", "u3"], "note_id": ["a", None, "c"],
                             "timestamp": pa.array([1, 2, None], pa.int64()), "action": ["x"] * 3}), path)
    with pytest.raises(store.StoreFormatError, match=rf"{path}: row 1: note_id is null"):
        store.read_events(path)


def test_check_events_type_and_offset():
    table = pa.table({"user_id": ["u1"], "note_id": ["a"], "timestamp": ["late"]})
    with pytest.raises(store.StoreFormatError, match="f.parquet: column 'timestamp' is string, not int64"):
        store.check_events(table, "f.parquet")
    with pytest.raises(store.StoreFormatError, match="missing column 'note_id'"):
        store.check_events(table.drop(["note_id"]), "f.parquet")
    nulls = pa.table({"user_id": pa.array([None], pa.string()), "note_id": ["a"], "timestamp": pa.array([1], pa.int64())})
    with pytest.raises(store.StoreFormatError, match=r"f.parquet: row 70000: user_id is null"):
        store.check_events(nulls, "f.parquet", first_row=70_000)
    store.check_events(nulls.slice(0, 0), "f.parquet")  # empty is fine
