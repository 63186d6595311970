"""The Beam engine of the cooccurrence/splits stages equals the in-memory engine (issue 13).

Real data: the 16 Stack Exchange dumps through prepare's stages with data.engine = "memory" and
"beam": the same pair files row for row (scores to 1e-9), the same split.json and stats.json counts.
Random logs: hypothesis property test of Beam's related pairs against cooccurrence.related_pairs.
Beam runs in-process (DirectRunner), except the Stack Exchange run (2 worker processes). Each Beam run
costs ~8 s of graph set-up here, so the property test packs several random logs into one run.
"""
import json
import shutil
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import notellm_jax  # noqa: F401
from notellm_jax.config import Config, DataConfig, override
from notellm_jax.data import beam_prepare, cooccurrence, prepare, store

pytestmark = pytest.mark.slow
PAIR_FILES = ("pairs_all", "pairs_train", "pairs_val", "pairs_test")


def assert_same_pairs(got: pa.Table, expected: pa.Table) -> None:
    assert got["note_a"].to_pylist() == expected["note_a"].to_pylist()
    assert got["note_b"].to_pylist() == expected["note_b"].to_pylist()
    np.testing.assert_allclose(got["score"].to_numpy(), expected["score"].to_numpy(), rtol=0, atol=1e-9)


def _without_timing(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if k not in ("seconds", "beam_seconds")}


@pytest.fixture(scope="module")
def imported(tmp_path_factory, shared_dir):
    """The Stack Exchange store, imported once."""
    root = tmp_path_factory.mktemp("se")
    config = override(Config(), {"paths.shared_dir": str(shared_dir), "paths.work_dir": str(root / "memory")})
    prepare.prepare(config, ["import"])
    return root, config


def test_stackexchange_beam_equals_memory(imported):
    """The splits stage (train- and test-period co-occurrence) on 2 Beam worker processes."""
    root, memory = imported
    beam_dir = root / "beam" / "data"
    beam_dir.mkdir(parents=True)
    for name in ("notes", "events", "pairs_postlinks", "pairs_given"):
        shutil.copy(memory.data_dir / f"{name}.parquet", beam_dir / f"{name}.parquet")
    beam = override(memory, {"paths.work_dir": str(root / "beam"), "data.engine": "beam", "data.beam_options":
                             ("--direct_num_workers=2", "--direct_running_mode=multi_processing")})
    expected, got = prepare.prepare(memory, ["splits"]), prepare.prepare(beam, ["splits"])
    for name in ("train", "val", "test"):
        assert_same_pairs(store.read_pairs(beam_dir / f"pairs_{name}.parquet"),
                          store.read_pairs(memory.data_dir / f"pairs_{name}.parquet"))
    assert len(store.read_pairs(beam_dir / "pairs_test.parquet")) > 1000
    assert (beam_dir / "split.json").read_text() == (memory.data_dir / "split.json").read_text()
    assert _without_timing(got["splits"]) == _without_timing(expected["splits"])
    assert got["splits"]["events"]["not_in_a_period"] > 0  # train events after the cut-off are counted
    assert json.loads((beam_dir / "stats.json").read_text())["config"]["data"]["engine"] == "beam"


# Small alphabets: ties in time, repeated touches and one-note users are frequent.
event_logs = st.lists(st.tuples(st.sampled_from([f"u{i}" for i in range(6)]),
                                st.sampled_from([f"n{i}" for i in range(7)]), st.integers(0, 8)),
                      min_size=1, max_size=60)


def _write_events(events, path) -> None:
    store.write_events({"user_id": [e[0] for e in events], "note_id": [e[1] for e in events],
                        "timestamp": [e[2] for e in events], "action": ["a"] * len(events)}, path)


def _disjoint_union(logs):
    """Several logs in one (ids prefixed by the log's index): one Beam run checks them all."""
    return [(f"{k}{u}", f"{k}{n}", t) for k, log in enumerate(logs) for u, n, t in log]


@example(logs=[[("u0", "n0", 0), ("u0", "n1", 1), ("u1", "n1", 0), ("u1", "n0", 2), ("u1", "n2", 3)],
               [("u0", "n0", 5), ("u0", "n1", 5), ("u2", "n3", 1), ("u2", "n1", 4)]],
         window_days=0.0, top_t=2, lower=0.0, fanout=3, bucket_events=7, split=0)
@example(logs=[[("u0", "n0", 0), ("u0", "n1", 1), ("u0", "n2", 2), ("u0", "n0", 3), ("u0", "n3", 4), ("u1", "n3", 0),
                ("u1", "n1", 2)]], window_days=0.0, top_t=0, lower=0.0, fanout=0, bucket_events=7, split=2)
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(logs=st.lists(event_logs, min_size=1, max_size=5), window_days=st.sampled_from([0.0, 2 / 86_400]),
       top_t=st.integers(0, 3), lower=st.sampled_from([0.0, 0.2]), fanout=st.sampled_from([0, 3]),
       bucket_events=st.sampled_from([7, 200_000]), split=st.sampled_from([0, 0, 3]))
def test_random_logs_beam_equals_memory(tmp_path, logs, window_days, top_t, lower, fanout, bucket_events, split):
    """bucket_events=7: many user buckets and note shards, so scores are summed across buckets.
    split: power users scored in chunks of that many events (both engines)."""
    data = DataConfig(cooc_window_days=window_days, cooc_top_t=top_t, cooc_lower=lower, cooc_upper=0.9,
                      beam_hot_key_fanout=fanout, cooc_user_split_events=split)
    _write_events(_disjoint_union(logs), tmp_path / "events.parquet")
    expected, expected_counts = cooccurrence.related_pairs(store.read_events(tmp_path / "events.parquet"), data)
    with mock.patch.object(beam_prepare, "EVENTS_PER_BUCKET", bucket_events):
        got, counts = beam_prepare.related_pairs(tmp_path / "events.parquet", data, tmp_path / "beam")
    assert_same_pairs(got, expected)
    assert _without_timing(counts) == expected_counts


def test_power_user_cap_changes_scores_and_counts(tmp_path):
    # u1 touches A, B, C, D in order (N=4); u2 touches A, B (N=2). Cap 2: u1 keeps A, B (N becomes 2).
    events = [("u1", "A", 1), ("u1", "B", 2), ("u1", "C", 3), ("u1", "D", 4), ("u2", "A", 1), ("u2", "B", 5)]
    _write_events(events, tmp_path / "events.parquet")
    data = DataConfig(cooc_lower=0.0, beam_max_user_notes=2)
    got, counts = beam_prepare.related_pairs(tmp_path / "events.parquet", data, tmp_path / "beam")
    assert got.to_pylist() == [{"note_a": "A", "note_b": "B", "score": 1.0}]
    assert counts["skipped"] == {"power_user_events": 2}
    uncapped, _ = cooccurrence.related_pairs(store.read_events(tmp_path / "events.parquet"), data)
    assert len(uncapped) == 6  # off by default: u1's 6 ordered pairs of A..D (A->B: 1/4 + 1/2)


def test_stable_bucket_is_the_documented_hash():
    """Against a pure-Python evaluation of the hash (sum of byte_i * P^i, splitmix64 finaliser), on
    a sliced Arrow array (non-zero offset), empty and non-ASCII ids."""
    def reference(text: str, buckets: int) -> int:
        h = sum(byte * 0x100000001B3 ** i for i, byte in enumerate(text.encode())) % 2**64
        for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
            h = ((h ^ (h >> shift)) * mult) % 2**64
        return (h ^ (h >> 31)) % buckets

    ids = ["", "u1", "u2", "n12345", "é☃", "a" * 40, "u1"]
    got = beam_prepare.stable_bucket(pa.array(["skip", *ids]).slice(1), 7)
    assert got.tolist() == [reference(i, 7) for i in ids]
    assert len(set(beam_prepare.stable_bucket(pa.array([f"u{i}" for i in range(1000)]), 10).tolist())) == 10


def test_null_field_names_file_and_row(tmp_path):
    path = tmp_path / "events.parquet"
    pq.write_table(pa.table({"user_id": ["u1", "u1", None], "note_id": ["a", "b", "c"],
                             "timestamp": pa.array([1, 2, 3], pa.int64()), "action": ["x"] * 3}), path)
    with pytest.raises(store.StoreFormatError, match=rf"{path}: row 2: user_id is null"):
        beam_prepare.related_pairs(path, DataConfig(), tmp_path / "beam")

