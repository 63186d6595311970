"""Prepare a run's data: import -> co-occurrence -> splits -> tokenised shards.

    notellm prepare --config configs/<name>.py [--set section.field=value ...]
        [--stages import,cooccurrence,splits,shards] [--force]

Everything is written to `<paths.work_dir>/data/`:
- import:       notes.parquet, events.parquet, pairs_postlinks.parquet (explicit Stack Exchange links
                between two questions), pairs_given.parquet (pairs the source supplies, e.g. the
                reference CSV's note_pairs files; empty otherwise)
- cooccurrence: pairs_all.parquet, related pairs over the whole log (for inspection and stats; the
                splits compute each period's pairs from that period's own log)
- splits:       pairs_train.parquet, pairs_val.parquet, pairs_test.parquet, split.json
- shards:       shards/ (TFRecords of the tokenised pairs, by `data.shards.write_shards`)
- tfds:         tfds/ (the notellm_prepared TensorFlow Datasets dataset of those shards, built on Beam;
                run by default only with data.train_input="tfds")
and stats.json: each stage's counts under its name, plus the config used.

After each stage its checks (data/checks.py) refuse a result no run can use (no training or validation
pairs, every note in one split, timestamps in the wrong unit or far in the future, one creation time for
all notes) with a one-line `DataQualityError` (exit 2) naming the cause, the field and the fix; the
stage's counts stay in stats.json with the message under "error", and its outputs are removed so that
the next run redoes it. With data.engine="beam" the
cooccurrence and splits stages run on Apache Beam (data/beam_prepare.py) and write the same files
(the pipeline's own files go to beam/).

A stage whose outputs all exist is skipped unless --force (`skip_stage`, the rule the main job's stages
follow too); once a stage runs, every later selected stage runs too, since its inputs changed.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from notellm_jax.config import Config
from notellm_jax.data import importers, shards, splits, store
from notellm_jax.data.checks import CHECKS
from notellm_jax.errors import ConfigError, NotellmError


def skip_stage(outputs: Iterable[Path], force: bool) -> bool:
    """The one stage-skip rule (prepare's stages, the main job's): a stage is skipped when it is not forced
    and every one of its outputs exists."""
    return not force and all(Path(o).exists() for o in outputs)


def run_import(config: Config, data_dir: Path) -> dict[str, Any]:
    return importers.import_source(config, data_dir)


def _use_beam(config: Config, given: pa.Table) -> bool:
    """Beam mines co-occurrence; a source that supplies its own pairs has none to mine."""
    if config.data.engine not in ("memory", "beam"):
        raise ConfigError(f"data.engine={config.data.engine!r}: expected 'memory' or 'beam'")
    return config.data.engine == "beam" and len(given) == 0


def run_cooccurrence(config: Config, data_dir: Path) -> dict[str, Any]:
    notes = store.read_note_table(data_dir / "notes.parquet")
    given = store.read_pairs(data_dir / "pairs_given.parquet")
    if _use_beam(config, given):
        from notellm_jax.data import beam_prepare  # Apache Beam only for this engine

        pairs, counts = beam_prepare.related_pairs(data_dir / "events.parquet", config.data,
                                                   data_dir / "beam" / "cooccurrence")
    else:
        events = store.read_events(data_dir / "events.parquet")
        pairs, counts = splits.period_pairs(events, given, notes["note_id"].combine_chunks(), config.data)
    store.write_pairs(pairs, data_dir / "pairs_all.parquet")
    return counts


def run_splits(config: Config, data_dir: Path) -> dict[str, Any]:
    notes = store.read_note_table(data_dir / "notes.parquet")
    given = store.read_pairs(data_dir / "pairs_given.parquet")
    if _use_beam(config, given):
        from notellm_jax.data import beam_prepare  # Apache Beam: only for data.engine=beam

        pairs, split, counts = beam_prepare.make_splits(notes, data_dir / "events.parquet", config.data,
                                                        data_dir / "beam" / "splits")
    else:
        events = store.read_events(data_dir / "events.parquet")
        pairs, split, counts = splits.make_splits(notes, events, given, config.data)
    for name, table in pairs.items():
        store.write_pairs(table, data_dir / f"pairs_{name}.parquet")
    (data_dir / "split.json").write_text(json.dumps(split, indent=1))
    return counts


def run_shards(config: Config, data_dir: Path) -> dict[str, Any]:
    return shards.write_shards(config, data_dir)


def run_tfds(config: Config, data_dir: Path) -> dict[str, Any]:
    from notellm_jax.data import tfds_dataset  # TensorFlow Datasets + Beam only for this stage

    return tfds_dataset.build(data_dir, config.data.beam_runner, config.data.beam_options)


PREPARE_STAGES: dict[str, tuple[Callable[[Config, Path], dict[str, Any]], tuple[str, ...]]] = {
    "import": (run_import, ("notes.parquet", "events.parquet", "pairs_postlinks.parquet", "pairs_given.parquet")),
    "cooccurrence": (run_cooccurrence, ("pairs_all.parquet",)),
    "splits": (run_splits, ("pairs_train.parquet", "pairs_val.parquet", "pairs_test.parquet", "split.json")),
    "shards": (run_shards, ("shards",)),
    "tfds": (run_tfds, ("tfds",)),
}


def default_stages(config: Config) -> list[str]:
    """Every stage; the TFDS dataset only when training reads it (data.train_input = "tfds")."""
    return [s for s in PREPARE_STAGES if s != "tfds" or config.data.train_input == "tfds"]


def parse_stages(text: str | None) -> list[str] | None:
    """`--stages a,b` -> the named stages in pipeline order (None = default_stages)."""
    if text is None:
        return None
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in PREPARE_STAGES]
    if unknown:
        raise ConfigError(f"--stages: unknown stage(s) {unknown}; stages: {','.join(PREPARE_STAGES)}")
    return [s for s in PREPARE_STAGES if s in names]  # always in pipeline order


def stages_to_run(config: Config, stages: Sequence[str] | None = None, force: bool = False) -> list[str]:
    """The stages (default_stages if None) that `prepare` would run: all with force, else every stage from
    the first one whose outputs are missing in <work_dir>/data on (a redone stage redoes what reads it)."""
    stages = default_stages(config) if stages is None else list(stages)
    for i, name in enumerate(stages):
        if not skip_stage((config.data_dir / o for o in PREPARE_STAGES[name][1]), force):
            return stages[i:]
    return []


def prepare(config: Config, stages: Sequence[str] | None = None, force: bool = False) -> dict[str, Any]:
    """Run the selected stages (default_stages if None) in order into <work_dir>/data; returns (and
    writes) stats.json's content."""
    stages = default_stages(config) if stages is None else stages
    data_dir = config.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    stats_path = data_dir / "stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    stats["config"] = config.to_dict()
    pending = stages_to_run(config, stages, force)
    for name in stages:
        if name not in pending:
            print(f"[prepare] {name}: outputs exist in {data_dir}, skipped (--force to redo)", flush=True)
            continue
        print(f"[prepare] {name} ...", flush=True)
        start = time.perf_counter()
        stats[name] = PREPARE_STAGES[name][0](config, data_dir)
        stats[name]["seconds"] = round(time.perf_counter() - start, 3)
        print(f"[prepare] {name}: {json.dumps(_headline(stats[name]))}", flush=True)
        _check_stage(config, name, stats, stats_path)
        stats_path.write_text(json.dumps(stats, indent=1))
    stats_path.write_text(json.dumps(stats, indent=1))
    return stats


def _check_stage(config: Config, name: str, stats: dict[str, Any], stats_path: Path) -> None:
    """The stage's checks (data/checks.py); on failure its counts and the error go to stats.json and its
    outputs are removed (a rerun redoes the stage), then the error propagates."""
    try:
        if name in CHECKS:
            CHECKS[name](config, config.data_dir, stats[name])
    except NotellmError as e:
        stats[name]["error"] = str(e)
        stats_path.write_text(json.dumps(stats, indent=1))
        for output in PREPARE_STAGES[name][1]:
            path = config.data_dir / output
            if path.is_file():
                path.unlink()
        raise


def _headline(counts: dict[str, Any]) -> dict[str, Any]:
    """A stage's counts without the bulky per-site breakdown, for the progress line."""
    return {k: v for k, v in counts.items() if k != "sites"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stages", help="comma-separated subset of import,cooccurrence,splits,shards,tfds "
                        "(default all; tfds only with data.train_input=tfds)")
    parser.add_argument("--force", action="store_true", help="rerun stages whose outputs exist")


def run(args, config: Config) -> dict[str, Any]:
    """`notellm prepare`: the selected stages; prints stats.json's counts."""
    stats = prepare(config, parse_stages(args.stages), args.force)
    print(json.dumps({k: v for k, v in stats.items() if k != "config"}, indent=1))
    return stats
