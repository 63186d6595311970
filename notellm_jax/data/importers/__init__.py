"""Importers that fill the note store (`store.py`) from three kinds of input, one module per source:

- `stackexchange`: Stack Exchange data dumps (data.source = "stackexchange");
- `reference_csv`: the reference code's CSV format, notes_*.csv + note_pairs_*.csv ("reference_csv");
- `jsonl`: your own data, notes.jsonl + events.jsonl ("generic"; the schema is that module's docstring).

Every source feeds one `builder.StoreBuilder`, which applies the rules they share and writes the store.
A failed record stops the import and nothing is written to the store.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from notellm_jax.config import Config
from notellm_jax.data.importers.builder import StoreBuilder
from notellm_jax.data.importers.jsonl import import_generic
from notellm_jax.data.importers.reference_csv import import_reference_csv
from notellm_jax.data.importers.stackexchange import import_stackexchange


def import_source(config: Config, data_dir: Path) -> dict[str, Any]:
    """Run the importer named by config.data.source on config.data.input_path; write the store into data_dir."""
    source = config.data.source
    folder = config.resolve(config.data.input_path)
    importers: dict[str, Callable[[StoreBuilder], dict[str, Any]]] = {
        "stackexchange": lambda b: import_stackexchange(folder, config.data.sites, b),
        "reference_csv": lambda b: import_reference_csv(folder, b, config.data.csv_category_depth),
        "generic": lambda b: import_generic(folder, b, config.data.timestamp_unit, config.data.strict_fields),
    }
    if source not in importers:
        raise ValueError(f"data.source={source!r}: expected one of {sorted(importers)}")
    builder = StoreBuilder(data_dir)
    try:
        details = importers[source](builder)
        counts = builder.finish(f"{source} input {folder}")
    except BaseException:
        builder.abort()
        raise
    return {"source": source, "input": str(folder), **counts, **details}
