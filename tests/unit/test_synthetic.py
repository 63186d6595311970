"""The synthetic behaviour log: schema, seeding, time order, creation before touch, power-law skew."""
import numpy as np
import pyarrow.compute as pc

from notellm_jax.data import store
from notellm_jax.data.synthetic import SyntheticLog, generate, write_store
from notellm_jax.main import main


def test_generate_is_seeded_and_consistent():
    log = SyntheticLog(num_events=20_000, seed=1)
    notes, events = generate(log)
    assert notes.schema.equals(store.NOTES_SCHEMA) and events.schema.equals(store.EVENTS_SCHEMA)
    assert len(events) == 20_000 and len(notes) == 1_000
    again_notes, again_events = generate(log)
    assert again_events.equals(events) and again_notes.equals(notes)
    assert not generate(SyntheticLog(num_events=20_000, seed=2))[1].equals(events)
    times = events["timestamp"].to_numpy()
    assert np.all(np.diff(times) >= 0)  # the log is written in time order
    joined = events.join(notes.select(["note_id", "created_at"]), "note_id")
    assert len(joined) == len(events)  # every event names a note of the catalogue
    assert not pc.any(pc.less(joined["timestamp"], joined["created_at"])).as_py()  # touches follow creation
    assert all(len(set(t)) == len(t) >= 1 for t in notes["topics"].to_pylist())
    exposure = dict(zip(notes["note_id"].to_pylist(), notes["exposure"].to_pylist()))
    counts = pc.value_counts(events["note_id"]).to_pylist()
    assert all(exposure[c["values"]] == 10 * c["counts"] for c in counts)


def test_skew_follows_the_parameters():
    log = SyntheticLog(num_events=100_000, seed=0, note_exponent=0.9, user_alpha=2.0, max_user_events=500)
    _, events = generate(log)
    per_user = np.array([c["counts"] for c in pc.value_counts(events["user_id"]).to_pylist()])
    # Pareto(alpha) + 1, floored: P(X >= k) = k^-alpha, so about 1 - 2^-2 = 75% of users act once.
    assert abs(np.mean(per_user == 1) - 0.75) < 0.02
    assert per_user.max() <= 500 and per_user.max() > 50 * np.median(per_user)
    per_note = np.sort([c["counts"] for c in pc.value_counts(events["note_id"]).to_pylist()])[::-1]
    ranks = np.arange(1, 101)
    slope = np.polyfit(np.log(ranks), np.log(per_note[:100]), 1)[0]
    assert abs(slope + 0.9) < 0.1  # Zipf: count ~ rank^-0.9 over the top 100 notes
    # Sessions: consecutive events of a user are mostly minutes apart, not spread over the month.
    users, times = events["user_id"].to_numpy(zero_copy_only=False), events["timestamp"].to_numpy()
    order = np.lexsort((times, users))
    same = users[order][1:] == users[order][:-1]
    gaps = np.diff(times[order])[same]
    assert np.median(gaps) < 600


def test_write_store_writes_the_import_files(tmp_path):
    counts = write_store(SyntheticLog(num_events=5_000), tmp_path)
    assert counts["events"] == 5_000 and len(store.read_events(tmp_path / "events.parquet")) == 5_000
    assert len(store.read_note_table(tmp_path / "notes.parquet")) == counts["notes"]
    assert len(store.read_pairs(tmp_path / "pairs_given.parquet")) == 0
    assert len(store.read_links(tmp_path / "pairs_postlinks.parquet")) == 0


def test_notellm_synthetic_writes_the_store(tmp_path, capsys):
    """The `notellm synthetic` command: the same store as write_store, its counts printed."""
    counts = main(["synthetic", "--out", str(tmp_path), "--events", "2000", "--seed", "3"])
    assert counts == write_store(SyntheticLog(num_events=2_000, seed=3), tmp_path / "again")
    assert str(counts) in capsys.readouterr().out
    assert len(store.read_events(tmp_path / "events.parquet")) == 2_000
