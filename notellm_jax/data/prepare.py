"""Prepare a run's data: import -> co-occurrence -> splits -> tokenised shards.

    python -m notellm_jax.data.prepare --config configs/<name>.py [--set section.field=value ...]
        [--stages import,cooccurrence,splits,shards] [--force]

Everything is written to `<paths.work_dir>/data/`:
- import:       notes.parquet, events.parquet, pairs_postlinks.parquet (explicit Stack Exchange links
                between two questions), pairs_given.parquet (pairs the source supplies, e.g. the
                reference CSV's note_pairs files; empty otherwise)
- cooccurrence: pairs_all.parquet, related pairs over the whole log (for inspection and stats; the
                splits compute each period's pairs from that period's own log)
- splits:       pairs_train.parquet, pairs_val.parquet, pairs_test.parquet, split.json
- shards:       shards/ (TFRecords of the tokenised pairs, by `data.input_pipeline.write_shards`)
and stats.json: each stage's counts under its name, plus the config used.

A stage whose outputs all exist is skipped unless --force; once a stage runs, every later selected
stage runs too, since its inputs changed.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from notellm_jax.config import Config
from notellm_jax.data import importers, splits, store
from notellm_jax.errors import ConfigError


def run_import(config: Config, data_dir: Path) -> dict[str, Any]:
    return importers.import_source(config, data_dir)


def run_cooccurrence(config: Config, data_dir: Path) -> dict[str, Any]:
    notes = store.read_note_table(data_dir / "notes.parquet")
    events = store.read_events(data_dir / "events.parquet")
    given = store.read_pairs(data_dir / "pairs_given.parquet")
    pairs, counts = splits.period_pairs(events, given, notes["note_id"].combine_chunks(), config.data)
    store.write_pairs(pairs, data_dir / "pairs_all.parquet")
    return counts


def run_splits(config: Config, data_dir: Path) -> dict[str, Any]:
    notes = store.read_note_table(data_dir / "notes.parquet")
    events = store.read_events(data_dir / "events.parquet")
    given = store.read_pairs(data_dir / "pairs_given.parquet")
    pairs, split, counts = splits.make_splits(notes, events, given, config.data)
    for name, table in pairs.items():
        store.write_pairs(table, data_dir / f"pairs_{name}.parquet")
    (data_dir / "split.json").write_text(json.dumps(split, indent=1))
    return counts


def run_shards(config: Config, data_dir: Path) -> dict[str, Any]:
    from notellm_jax.data.input_pipeline import write_shards  # TensorFlow only when shards are written
    return write_shards(config, data_dir)


STAGES: dict[str, tuple[Callable[[Config, Path], dict[str, Any]], tuple[str, ...]]] = {
    "import": (run_import, ("notes.parquet", "events.parquet", "pairs_postlinks.parquet", "pairs_given.parquet")),
    "cooccurrence": (run_cooccurrence, ("pairs_all.parquet",)),
    "splits": (run_splits, ("pairs_train.parquet", "pairs_val.parquet", "pairs_test.parquet", "split.json")),
    "shards": (run_shards, ("shards",)),
}


def parse_stages(text: str | None) -> list[str]:
    """`--stages a,b` -> the named stages in pipeline order (None = all)."""
    if text is None:
        return list(STAGES)
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise ConfigError(f"--stages: unknown stage(s) {unknown}; stages: {','.join(STAGES)}")
    return [s for s in STAGES if s in names]  # always in pipeline order


def prepare(config: Config, stages: Sequence[str] = tuple(STAGES), force: bool = False) -> dict[str, Any]:
    """Run the selected stages in order into <work_dir>/data; returns (and writes) stats.json's content."""
    data_dir = config.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    stats_path = data_dir / "stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    stats["config"] = config.to_dict()
    ran_earlier = False
    for name in stages:
        run, outputs = STAGES[name]
        if not (force or ran_earlier) and all((data_dir / o).exists() for o in outputs):
            print(f"[prepare] {name}: outputs exist in {data_dir}, skipped (--force to redo)", flush=True)
            continue
        print(f"[prepare] {name} ...", flush=True)
        start = time.perf_counter()
        stats[name] = run(config, data_dir)
        stats[name]["seconds"] = round(time.perf_counter() - start, 3)
        ran_earlier = True
        print(f"[prepare] {name}: {json.dumps(_headline(stats[name]))}", flush=True)
        stats_path.write_text(json.dumps(stats, indent=1))
    stats_path.write_text(json.dumps(stats, indent=1))
    return stats


def _headline(counts: dict[str, Any]) -> dict[str, Any]:
    """A stage's counts without the bulky per-site breakdown, for the progress line."""
    return {k: v for k, v in counts.items() if k != "sites"}


def run(args, config: Config) -> dict[str, Any]:
    """`notellm prepare`: the selected stages; prints stats.json's counts."""
    stats = prepare(config, parse_stages(args.stages), args.force)
    print(json.dumps({k: v for k, v in stats.items() if k != "config"}, indent=1))
    return stats


if __name__ == "__main__":
    import sys

    from notellm_jax.main import main

    main(["prepare", *sys.argv[1:]])
