"""Time splits (METHOD.md 5) and the prepare CLI on small generated stores."""
import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from notellm_jax.config import DataConfig
from notellm_jax.data import cooccurrence, splits, store
from notellm_jax.main import main

DAY = 86_400


def _notes(created: dict[str, tuple[str, int]]) -> pa.Table:
    return store.to_table({"note_id": list(created), "title": ["t"] * len(created), "content": ["c"] * len(created),
                           "topics": [["x"]] * len(created), "category": [c for c, _ in created.values()],
                           "created_at": [t for _, t in created.values()], "exposure": [-1] * len(created)},
                          store.NOTES_SCHEMA)


def test_time_cutoffs_by_hand():
    created = {f"x{i}": ("x", i) for i in range(1, 11)} | {f"y{i}": ("y", 100 + i) for i in range(5)}
    notes = _notes(created)
    # x: 10 values, 0.8 * 9 = 7.2 -> the 9th smallest (9); y: 0.8 * 4 = 3.2 -> the 5th (104).
    assert splits.time_cutoffs(notes, 0.8, "category") == {"x": 9, "y": 104}
    # all 15 sorted: 0.8 * 14 = 11.2 -> the 13th smallest, 102.
    assert splits.time_cutoffs(notes, 0.8, "global") == {"*": 102}
    with pytest.raises(ValueError, match="test_time_quantile"):
        splits.time_cutoffs(notes, 1.0, "global")
    with pytest.raises(ValueError, match="split_scope"):
        splits.time_cutoffs(notes, 0.5, "site")


def _random_store(seed: int = 0) -> tuple[pa.Table, pa.Table]:
    rng = random.Random(seed)
    created = {f"{c}/{i}": (c, i * DAY + (7 if c == "b" else 0)) for c in ("a", "b") for i in range(30)}
    events = []
    for u in range(40):
        for note in rng.sample(sorted(created), rng.randint(1, 8)):
            events.append((f"u{u}", note, created[note][1] + rng.randint(0, 20) * DAY, "answer"))
    events_table = store.to_table({"user_id": [e[0] for e in events], "note_id": [e[1] for e in events],
                                   "timestamp": [e[2] for e in events], "action": [e[3] for e in events]},
                                  store.EVENTS_SCHEMA)
    return _notes(created), events_table


@pytest.mark.parametrize("before_cutoff", [True, False])
def test_make_splits_properties(before_cutoff):
    notes, events = _random_store()
    data = DataConfig(test_time_quantile=0.7, val_fraction=0.25, cooc_lower=0.0, cooc_top_t=3,
                      train_events_before_cutoff=before_cutoff, seed=3)
    given = store.to_table({"note_a": [], "note_b": [], "score": []}, store.PAIRS_SCHEMA)
    pairs, split, stats = splits.make_splits(notes, events, given, data)
    cutoff = {c: sorted(t for n, t in zip(notes["note_id"].to_pylist(), notes["created_at"].to_pylist())
                        if n.startswith(c))[21] for c in ("a", "b")}  # 0.7 * 29 = 20.3 -> 22nd smallest
    assert split["cutoffs"] == cutoff
    created = dict(zip(notes["note_id"].to_pylist(), notes["created_at"].to_pylist()))
    test_notes = {n for n, t in created.items() if t >= cutoff[n[0]]}
    assert set(split["test_notes"]) == test_notes and len(test_notes) == 18  # notes 21..29 of each category
    assert set(split["train_notes"]) == set(created) - test_notes

    # Train + val pairs = related pairs of the training-period log, built here with plain Python.
    rows = events.to_pylist()
    train_log = [e for e in rows if e["note_id"] not in test_notes
                 and (not before_cutoff or e["timestamp"] < cutoff[e["note_id"][0]])]
    expected, _ = cooccurrence.related_pairs(store.to_table(train_log, store.EVENTS_SCHEMA), data)
    got = pairs["train"].to_pylist() + pairs["val"].to_pylist()
    assert sorted(map(tuple, (r.values() for r in got))) == sorted(map(tuple, (r.values() for r in expected.to_pylist())))
    test_log = [e for e in rows if e["note_id"] in test_notes]
    expected_test, _ = cooccurrence.related_pairs(store.to_table(test_log, store.EVENTS_SCHEMA), data)
    assert len(pairs["test"]) == len(expected_test) > 0

    # No training note in the test set; validation queries are never training queries.
    test_pair_notes = set(pairs["test"]["note_a"].to_pylist() + pairs["test"]["note_b"].to_pylist())
    assert test_pair_notes <= test_notes
    assert not set(pairs["val"]["note_a"].to_pylist()) & set(pairs["train"]["note_a"].to_pylist())
    sources = set(expected["note_a"].to_pylist())
    assert set(split["val_source_notes"]) == set(pairs["val"]["note_a"].to_pylist())
    assert len(split["val_source_notes"]) == round(0.25 * len(sources))
    # Test order: score descending, then ids.
    keys = [(-r["score"], r["note_a"], r["note_b"]) for r in pairs["test"].to_pylist()]
    assert keys == sorted(keys)
    assert stats["pairs"] == {"train_before_cap": len(pairs["train"]), "train": len(pairs["train"]),
                              "val": len(pairs["val"]), "test": len(pairs["test"])}
    # Same seed, same split; the cap samples a subset.
    again, _, _ = splits.make_splits(notes, events, given, data)
    assert again["val"].equals(pairs["val"])
    data = dataclasses.replace(data, max_train_pairs=5)  # configs are frozen
    capped, _, _ = splits.make_splits(notes, events, given, data)
    assert len(capped["train"]) == 5
    assert set(map(tuple, (r.values() for r in capped["train"].to_pylist()))) <= \
        set(map(tuple, (r.values() for r in pairs["train"].to_pylist())))


def _write_config(tmp_path: Path, source: str, input_dir: Path) -> Path:
    path = tmp_path / "cfg.py"
    path.write_text(
        "from notellm_jax.config import Config, DataConfig, PathsConfig\n"
        "def get_config():\n"
        f"    return Config(name='t', paths=PathsConfig(work_dir={str(tmp_path / 'run')!r}),\n"
        f"                  data=DataConfig(source={source!r}, input_path={str(input_dir)!r}, cooc_lower=0.0))\n")
    return path


def test_prepare_cli_generic(tmp_path, capsys):
    notes, events = _random_store(seed=1)
    src = tmp_path / "src"
    src.mkdir()
    (src / "notes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in notes.to_pylist()))
    (src / "events.jsonl").write_text("".join(json.dumps(r) + "\n" for r in events.to_pylist()))
    config = _write_config(tmp_path, "generic", src)
    stages = ["--stages", "import,cooccurrence,splits"]
    assert "import" in main(["prepare", "--config", str(config), *stages])
    data_dir = tmp_path / "run" / "data"
    stats = json.loads((data_dir / "stats.json").read_text())
    assert stats["import"]["notes_written"] == 60 and stats["import"]["events_written"] == len(events)
    assert stats["config"]["data"]["source"] == "generic" and "shards" not in stats
    for name in ("train", "val", "test"):
        assert len(store.read_pairs(data_dir / f"pairs_{name}.parquet")) == stats["splits"]["pairs"][name]
    assert len(store.read_pairs(data_dir / "pairs_all.parquet")) == stats["cooccurrence"]["after_top_t"]
    assert store.read_note_table(data_dir / "notes.parquet").equals(notes)

    capsys.readouterr()
    main(["prepare", "--config", str(config), *stages])
    assert capsys.readouterr().out.count("outputs exist") == 3
    # A stage whose output is missing runs again, and so does every stage after it (they read its output).
    (data_dir / "pairs_all.parquet").unlink()
    main(["prepare", "--config", str(config), *stages])
    out = capsys.readouterr().out
    assert out.count("outputs exist") == 1 and "[prepare] cooccurrence ..." in out and "[prepare] splits ..." in out
    main(["prepare", "--config", str(config), "--stages", "cooccurrence,splits", "--force",
                  "--set", "data.cooc_top_t=1"])
    assert "outputs exist" not in capsys.readouterr().out
    stats = json.loads((data_dir / "stats.json").read_text())
    pairs_all = store.read_pairs(data_dir / "pairs_all.parquet")
    assert len(set(pairs_all["note_a"].to_pylist())) == len(pairs_all) == stats["cooccurrence"]["after_top_t"]
    with pytest.raises(SystemExit):
        main(["prepare", "--config", str(config), "--stages", "import,bogus"])


def test_prepare_reference_csv_uses_given_pairs(tmp_path):
    src = tmp_path / "csv"
    src.mkdir()
    rows = "".join(f"n{i},Title {i},text #t{i % 3}#,img,cat@sub\n" for i in range(10))
    (src / "notes_0.csv").write_text("note_id,title,content,image_id,category\n" + rows)
    (src / "note_pairs_0.csv").write_text("a,b\nn0,n1\nn2,n3\nn8,n9\nn7,n8\nn1,n9\nn0,n99\n")
    config = _write_config(tmp_path, "reference_csv", src)
    main(["prepare", "--config", str(config), "--stages", "import,cooccurrence,splits",
                  "--set", "data.val_fraction=0.0"])
    data_dir = tmp_path / "run" / "data"
    stats = json.loads((data_dir / "stats.json").read_text())
    assert stats["import"]["skipped"]["given_pair.unknown_note"] == 1
    # created_at = row ordinal 0..9; 0.8 quantile -> ordinal 8: n8, n9 are test notes.
    pairs = {n: store.read_pairs(data_dir / f"pairs_{n}.parquet").to_pylist() for n in ("train", "test")}
    assert [(p["note_a"], p["note_b"]) for p in pairs["train"]] == [("n0", "n1"), ("n2", "n3")]
    assert [(p["note_a"], p["note_b"]) for p in pairs["test"]] == [("n8", "n9")]
    assert stats["splits"]["test_period_pairs"] == {"given_pairs": 5, "given_pairs_in_period": 1}
    assert np.array_equal(store.read_note_table(data_dir / "notes.parquet")["category"].to_numpy(zero_copy_only=False),
                          np.array(["cat"] * 10, dtype=object))
