"""Import traps (issue 29, item 2), each on small files written here: what real exports contain is read
(a BOM, integral floats, millisecond timestamps with data.timestamp_unit), what is useless is an error
with a hint (DataQualityError / InputFormatError: file, line, field, fix; counts left in stats.json),
what is odd is counted (whitespace-only text, unknown fields, events before their note's creation)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from notellm_jax.config import Config, override
from notellm_jax.data import importers, input_pipeline, prepare, shards, store
from notellm_jax.errors import ConfigError, DataQualityError, InputFormatError, NotellmError
from notellm_jax.main import main

BASE = 1_577_836_800  # 2020-01-01T00:00:00Z
DAY = 86_400
STAGES = ["import", "cooccurrence", "splits"]


def _notes(n: int = 20, created=lambda i: BASE + i * DAY) -> list[dict]:
    return [{"note_id": f"n{i}", "title": f"Title {i}", "content": f"text {i}", "topics": ["t"], "category": "c",
             "created_at": created(i)} for i in range(n)]


def _events(time=lambda t: t) -> list[dict]:
    """Users u0..u14 touch three training notes each before the cut-off (note 16's creation); t0..t3 touch
    the four test notes after it."""
    train = [{"user_id": f"u{k}", "note_id": f"n{(k + j) % 16}", "timestamp": time(BASE + 15 * DAY + 10 * k + j),
              "action": "click"} for k in range(15) for j in (0, 1, 3)]
    test = [{"user_id": f"t{k}", "note_id": f"n{16 + (k + j) % 4}", "timestamp": time(BASE + 21 * DAY + 10 * k + j),
             "action": "click"} for k in range(4) for j in (0, 1)]
    return train + test


def _write(folder: Path, notes: list, events: list, bom: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, records in (("notes.jsonl", notes), ("events.jsonl", events)):
        text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
        (folder / name).write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return folder


def _config(tmp_path: Path, src: Path, **data) -> Config:
    values = {"data.source": "generic", "data.input_path": str(src), "paths.work_dir": str(tmp_path / "run"),
              "data.cooc_lower": 0.0, "data.split_scope": "global", "data.val_fraction": 0.2,
              **{f"data.{k}": v for k, v in data.items()}}
    return override(Config(), values)


def _prepare(tmp_path: Path, notes: list, events: list, bom: bool = False, **data) -> dict:
    return prepare.prepare(_config(tmp_path, _write(tmp_path / "src", notes, events, bom), **data), STAGES)


def _stats(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "run" / "data" / "stats.json").read_text())


def _refused(tmp_path: Path, notes: list, events: list, match: str, stage: str, **data) -> dict:
    """prepare raises DataQualityError matching `match`; the stage's counts and the error stay in
    stats.json and its outputs are gone (a rerun redoes it)."""
    with pytest.raises(DataQualityError, match=match):
        _prepare(tmp_path, notes, events, **data)
    stats = _stats(tmp_path)
    assert stats[stage]["error"] and stage == list(k for k in stats if k != "config")[-1]
    outputs = prepare.PREPARE_STAGES[stage][1]
    assert not any((tmp_path / "run" / "data" / o).exists() for o in outputs)
    return stats


# ----------------------------------------------------------------------------- healthy baseline


def test_healthy_input_prepares_with_pairs_in_every_split(tmp_path):
    stats = _prepare(tmp_path, _notes(), _events())
    assert stats["splits"]["pairs"]["train"] > 0 and stats["splits"]["pairs"]["val"] > 0
    assert stats["splits"]["pairs"]["test"] > 0 and stats["splits"]["notes"] == {"train": 16, "test": 4}
    assert stats["import"]["timestamp_units"]["timestamp"]["unit"] == "s"
    assert stats["import"]["timestamp_units"]["timestamp"]["detected"] is True
    assert stats["import"]["unknown_fields"] == {} and "error" not in stats["splits"]


# ----------------------------------------------------------------------------- tolerant readers


def test_bom_and_integral_floats_are_read(tmp_path):
    notes = [{**n, "created_at": float(n["created_at"]), "exposure": 12.0} for n in _notes()]
    stats = _prepare(tmp_path, notes, _events(time=float), bom=True)
    assert stats["import"]["notes_written"] == 20 and stats["import"]["events_written"] == len(_events())
    table = store.read_note_table(tmp_path / "run" / "data" / "notes.parquet").to_pylist()
    assert table[0]["note_id"] == "n0" and table[0]["created_at"] == BASE and table[0]["exposure"] == 12
    assert store.read_events(tmp_path / "run" / "data" / "events.parquet")["timestamp"][0].as_py() == BASE + 15 * DAY


@pytest.mark.parametrize("field,value", [("created_at", 1577836800.5), ("exposure", 2.5)])
def test_non_integral_float_is_still_an_error(tmp_path, field, value):
    notes = _notes(3)
    notes[1][field] = value
    with pytest.raises(InputFormatError, match=rf"notes\.jsonl:2: field '{field}' must be .*got float {value}"):
        _prepare(tmp_path, notes, _events())


@pytest.mark.parametrize("unit,factor", [("ms", 1_000), ("us", 1_000_000)])
def test_auto_detects_milliseconds_and_microseconds(tmp_path, unit, factor):
    notes = [{**n, "created_at": n["created_at"] * factor} for n in _notes()]
    stats = _prepare(tmp_path, notes, _events(time=lambda t: t * factor + 7))
    used = stats["import"]["timestamp_units"]
    assert used["created_at"]["unit"] == used["timestamp"]["unit"] == unit and used["timestamp"]["detected"]
    assert used["created_at"]["sample_median"] == pytest.approx((BASE + 9.5 * DAY) * factor)
    assert used["created_at"]["sample_size"] == 20 and used["timestamp"]["sample_size"] == len(_events())
    assert stats["import"]["timestamps"]["created_at"]["min"] == BASE and stats["splits"]["pairs"]["train"] > 0


def test_explicit_unit_converts_without_detection(tmp_path):
    stats = _prepare(tmp_path, [{**n, "created_at": n["created_at"] * 1000} for n in _notes()],
                     _events(time=lambda t: t * 1000), timestamp_unit="ms")
    assert stats["import"]["timestamp_units"]["created_at"] == {
        "file": str(tmp_path / "src" / "notes.jsonl"), "unit": "ms", "detected": False, "sample_median": None,
        "sample_size": 0}
    assert stats["import"]["timestamps"]["timestamp"]["min"] == BASE + 15 * DAY


# ----------------------------------------------------------------------------- useless timestamps


def test_milliseconds_read_as_seconds_is_refused_with_the_unit_to_set(tmp_path):
    stats = _refused(tmp_path, _notes(), _events(time=lambda t: t * 1000),
                     r"events\.jsonl: field 'timestamp' looks like milliseconds \(median 1\.6e12 read as seconds, "
                     r"the year 52,\d\d\d\); set data\.timestamp_unit='ms' or 'auto'", "import", timestamp_unit="s")
    assert stats["import"]["events_written"] == len(_events())
    assert stats["import"]["timestamps"]["timestamp"]["median"] > 1e12


def test_microseconds_read_as_milliseconds_names_microseconds(tmp_path):
    _refused(tmp_path, [{**n, "created_at": n["created_at"] * 10**6} for n in _notes()], _events(),
             r"notes\.jsonl: field 'created_at' looks like microseconds .*set data\.timestamp_unit='us'", "import",
             timestamp_unit="ms")


def test_seconds_read_as_milliseconds_is_refused(tmp_path):
    _refused(tmp_path, _notes(), _events(), r"notes\.jsonl: field 'created_at' looks like seconds read as "
             r"milliseconds \(median 1970-01-19T.*\); set data\.timestamp_unit='s' or 'auto'", "import",
             timestamp_unit="ms")


def test_nanoseconds_are_named(tmp_path):
    _refused(tmp_path, _notes(), _events(time=lambda t: t * 10**9),
             r"events\.jsonl: field 'timestamp' looks like nanoseconds \(median 1\.6e18\), which are not supported",
             "import")


def test_far_future_is_refused(tmp_path):
    _refused(tmp_path, _notes(created=lambda i: 50_000_000_000 + i * DAY), _events(),
             r"notes\.jsonl: field 'created_at' lies far in the future \(median 3554-.*\); check the field's unit",
             "import")


def test_all_notes_sharing_one_creation_time_is_refused(tmp_path):
    stats = _refused(tmp_path, _notes(created=lambda i: BASE), _events(),
                     r"notes\.jsonl: field 'created_at': all 20 notes share one creation time "
                     r"\(2020-01-01T00:00:00Z\)", "import")
    assert stats["import"]["timestamps"]["created_at"]["distinct"] == 1


@pytest.mark.parametrize("value", [-5, "1969-12-31T23:59:59Z", -5.0])
def test_negative_timestamps_are_refused_with_file_and_line(tmp_path, value):
    events = _events()
    events[2]["timestamp"] = value
    with pytest.raises(InputFormatError, match=r"events\.jsonl:3: field 'timestamp' is before 1970"):
        _prepare(tmp_path, _notes(), events)
    assert not (tmp_path / "run" / "data" / "notes.parquet").exists()


@pytest.mark.parametrize("field,value", [("created_at", 10**20), ("exposure", 10**20), ("created_at", 1e20),
                                         ("created_at", -(10**20))])
def test_out_of_range_integers_are_refused_with_file_and_line(tmp_path, field, value):
    notes = _notes(4)
    notes[3][field] = value
    with pytest.raises(InputFormatError, match=rf"notes\.jsonl:4: field '{field}' is out of range: "
                                               rf"{int(value)} does not fit a 64-bit integer"):
        _prepare(tmp_path, notes, _events())


def test_unknown_timestamp_unit_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="data.timestamp_unit 'sec': s | ms | us | auto"):
        _prepare(tmp_path, _notes(), _events(), timestamp_unit="sec")
    with pytest.raises(ConfigError, match="data.timestamp_unit 'sec'"):
        _config(tmp_path, tmp_path, timestamp_unit="sec").validate(1)


# ----------------------------------------------------------------------------- counted oddities


def test_unknown_fields_warn_once_per_file_with_the_nearest_name(tmp_path, caplog):
    notes = [{**n, "exposures": 5, "colour": "red"} for n in _notes()]
    events = [{**e, "timestmap": 1} for e in _events()]
    with caplog.at_level(logging.WARNING, logger="notellm_jax"):
        stats = _prepare(tmp_path, notes, events)
    warnings = [r.getMessage() for r in caplog.records if "unknown field" in r.getMessage()]
    assert len(warnings) == 2
    assert "notes.jsonl: unknown field(s) ignored: 'colour' x20, 'exposures' x20 (did you mean 'exposure'?)" \
        in warnings[0]
    assert "events.jsonl: unknown field(s) ignored: 'timestmap' x53 (did you mean 'timestamp'?)" in warnings[1]
    assert stats["import"]["unknown_fields"] == {"notes.jsonl": {"colour": 20, "exposures": 20},
                                                 "events.jsonl": {"timestmap": 53}}


def test_strict_fields_makes_an_unknown_field_an_error(tmp_path):
    notes = _notes(3)
    notes[1]["exposures"] = 5
    with pytest.raises(InputFormatError, match=r"notes\.jsonl:2: unknown field 'exposures' \(did you mean "
                                               r"'exposure'\?\); data\.strict_fields=True refuses"):
        _prepare(tmp_path, notes, _events(), strict_fields=True)


def test_whitespace_only_text_is_flagged_and_both_blank_is_skipped(tmp_path):
    notes = _notes()
    notes[0]["title"], notes[1]["content"] = "  \t", "\n \n"
    notes.append({**notes[2], "note_id": "blank", "title": " ", "content": "\u3000\n"})
    stats = _prepare(tmp_path, notes, _events())["import"]
    assert stats["notes_flagged_kept"] == {"empty_content": 1, "empty_title": 1, "no_topics": 0}
    assert stats["skipped"]["note.no_title_and_no_content"] == 1 and stats["notes_written"] == 20


def test_events_before_their_note_are_kept_and_counted(tmp_path):
    events = _events() + [{"user_id": "early", "note_id": "n19", "timestamp": BASE, "action": "click"}]
    stats = _prepare(tmp_path, _notes(), events)["import"]
    # every _events() event follows its note's creation; the early one on n19 (created BASE + 19 days) does not
    assert stats["events_flagged_kept"] == {"before_note_created": 1}
    assert stats["events_written"] == len(events)


# ----------------------------------------------------------------------------- useless splits


def test_zero_training_pairs_is_refused(tmp_path):
    late = [{**e, "timestamp": e["timestamp"] + 30 * DAY} for e in _events()]  # every event after the cut-off
    stats = _refused(tmp_path, _notes(), late, r"run/data: no training pairs \(0 of 53 events fall in the "
                     r"training period, 16 training notes\); likely causes: events' field 'timestamp'", "splits")
    assert stats["splits"]["pairs"]["train"] == 0 and stats["splits"]["events"]["train_period"] == 0


def test_zero_validation_pairs_is_refused(tmp_path):
    _refused(tmp_path, _notes(), _events(), r"no validation pairs \(\d+ training-period pairs, 0 source notes "
             r"held out with data\.val_fraction=0\.01\); raise data\.val_fraction", "splits", val_fraction=0.01)
    stats = _prepare(tmp_path, _notes(), _events(), val_fraction=0.0)  # 0 asks for no validation
    assert stats["splits"]["pairs"]["val"] == 0 and "error" not in stats["splits"]


def test_all_notes_in_one_split_is_refused(tmp_path):
    notes = [{**n, "category": f"c{i}"} for i, n in enumerate(_notes())]  # one note per category: all test
    stats = _refused(tmp_path, notes, _events(), r"all 20 notes fall in the test split .*field 'created_at'",
                     "splits", split_scope="category")
    assert stats["splits"]["notes"] == {"train": 0, "test": 20}


def test_no_related_pairs_at_all_is_refused(tmp_path):
    lonely = [{**e, "user_id": f"solo{i}"} for i, e in enumerate(_events())]  # one note per user
    _refused(tmp_path, _notes(), lonely, r"no related pairs over the whole behaviour log .*field 'user_id'",
             "cooccurrence")


def test_prepare_cli_exits_2_with_the_hint(tmp_path, capsys):
    src = _write(tmp_path / "src", _notes(), _events(time=lambda t: t * 1000))
    config = tmp_path / "cfg.py"
    config.write_text("from notellm_jax.config import Config, DataConfig, PathsConfig\n"
                      "def get_config():\n"
                      f"    return Config(name='t', paths=PathsConfig(work_dir={str(tmp_path / 'run')!r}),\n"
                      f"                  data=DataConfig(source='generic', input_path={str(src)!r}))\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "--config", str(config), "--stages", "import", "--set", "data.timestamp_unit=s"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("notellm prepare: error: events.jsonl: field 'timestamp' looks like milliseconds")
    assert _stats(tmp_path)["import"]["error"] in err[-1]


# ----------------------------------------------------------------------------- train refuses no batch


def test_train_refuses_prepared_data_without_one_batch(tmp_path):
    config = override(_config(tmp_path, tmp_path), {"train.batch_pairs": 8, "train.max_steps": 10})
    out = shards.shards_dir(config.data_dir)
    out.mkdir(parents=True)
    meta = {"files": {"train": [3, 2], "val": [1, 0], "test": [4, 0]}, "num_shards": 2, "tokenizer": "tok",
            "prompt_hash": shards.prompt_hash(config, "tok")}
    (out / shards.META).write_text(json.dumps(meta))
    with pytest.raises(DataQualityError) as error:
        input_pipeline.total_train_steps(config)
    assert isinstance(error.value, NotellmError) and str(error.value) == (
        f"{config.data_dir}: the prepared data cannot give one training batch: pairs per split "
        "{'train': 5, 'val': 1, 'test': 4} vs train.batch_pairs=8 over 1 process(es); lower train.batch_pairs "
        "or prepare more data (stats.json there has each stage's counts)")
    with pytest.raises(DataQualityError) as error:  # 1 validation pair: no batch of 4 to validate on
        input_pipeline.total_train_steps(override(config, {"train.batch_pairs": 4, "train.eval_batches": 2}))
    assert str(error.value) == (
        f"{config.data_dir}: 1 validation pairs cannot give one batch of train.batch_pairs=4 over 1 process(es), "
        "and train.eval_batches=2 asks for validation; raise data.val_fraction, lower train.batch_pairs or set "
        "train.eval_batches=0")
    assert input_pipeline.total_train_steps(override(config, {"train.batch_pairs": 4, "train.eval_batches": 0})) == 10
    with pytest.raises(ConfigError, match="train.synthetic_data needs train.max_steps > 0"):
        input_pipeline.total_train_steps(override(config, {"train.synthetic_data": True, "train.max_steps": 0}))


def test_import_source_reports_units_for_the_generic_source_only(tmp_path):
    src = _write(tmp_path / "src", _notes(3), _events()[:3])
    stats = importers.import_source(_config(tmp_path, src), tmp_path / "store")
    assert set(stats["timestamp_units"]) == {"created_at", "timestamp"}
    assert stats["timestamps"]["created_at"] == {"min": BASE, "median": BASE + DAY, "max": BASE + 2 * DAY,
                                                 "distinct": 3}
