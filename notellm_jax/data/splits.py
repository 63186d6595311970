"""Time splits as the paper does them (METHOD.md 5): train pairs from an earlier period, test notes
from a later one with no training note among them, validation from the training period.

- Cut-off: the `test_time_quantile` quantile of note created_at (numpy's "higher" method, so it is
  a real creation time); notes created at or after it are test notes, the rest train notes. With
  `split_scope="category"` each category (Stack Exchange site) gets its own cut-off: the sites span
  2010-2023, and one global cut-off would make the test set a couple of whole, recent sites.
- Each period is its own behaviour log, like the paper's one-week logs: train pairs come from the
  co-occurrence of events on train notes (only those before the note's cut-off when
  `train_events_before_cutoff`, so no test-period behaviour is used), test pairs from events on
  test notes. N_u counts the notes a user touched within that period's log. A pair never mixes
  periods, so no training note can appear in a test pair.
- Sources that come with their own pairs (reference CSV) use those instead of co-occurrence: pairs
  with both notes in one period go to that period, the rest are counted as cross-period.
- Validation holds out a seeded `val_fraction` of the training pairs' source notes A with all their
  pairs, so validation queries are never training queries (their notes may still appear as a
  training pair's B).
- Row order: test and validation pairs are sorted by score descending, then note_a, then note_b
  (the evaluation reads test pairs in order and keeps the first pair of each query); training pairs
  are sorted by note_a, score descending, note_b (the pipeline shuffles them).
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from notellm_jax.config import DataConfig
from notellm_jax.data.cooccurrence import related_pairs


def time_cutoffs(notes: pa.Table, quantile: float, scope: str) -> dict[str, int]:
    """Cut-off created_at per category (scope "category") or {"*": cut-off} (scope "global")."""
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"data.test_time_quantile={quantile} must be in (0, 1)")
    created = notes["created_at"].to_numpy()
    if scope == "global":
        return {"*": int(np.quantile(created, quantile, method="higher"))}
    if scope != "category":
        raise ValueError(f"data.split_scope={scope!r}: expected 'category' or 'global'")
    categories = notes["category"].to_numpy(zero_copy_only=False)
    return {c: int(np.quantile(created[categories == c], quantile, method="higher"))
            for c in sorted(set(categories))}


def note_cutoffs(table: pa.Table, cutoffs: dict[str, int]) -> np.ndarray:
    """The cut-off that applies to each row of a table with a `category` column."""
    if "*" in cutoffs:
        return np.full(len(table), cutoffs["*"], np.int64)
    categories = table["category"].to_numpy(zero_copy_only=False)
    return np.array([cutoffs[c] for c in categories], np.int64)


def period_events(events: pa.Table, notes: pa.Table, is_test: np.ndarray, cutoffs: dict[str, int],
                  before_cutoff: bool) -> tuple[pa.Table, pa.Table]:
    """(train-period events, test-period events): events on train / test notes, see module docstring."""
    note_info = pa.table({"note_id": notes["note_id"], "category": notes["category"],
                          "is_test": pa.array(is_test)})
    joined = events.join(note_info, "note_id", join_type="inner")
    test_mask = joined["is_test"].to_numpy(zero_copy_only=False)
    train_mask = ~test_mask
    if before_cutoff:
        train_mask &= joined["timestamp"].to_numpy() < note_cutoffs(joined, cutoffs)
    columns = events.column_names
    return joined.filter(pa.array(train_mask)).select(columns), joined.filter(pa.array(test_mask)).select(columns)


def period_pairs(events: pa.Table, given: pa.Table, period_notes: pa.Array, data: DataConfig
                 ) -> tuple[pa.Table, dict[str, int]]:
    """Related pairs of one period: the given pairs inside it if the source has any, else co-occurrence."""
    if len(given):
        inside = pc.and_(pc.is_in(given["note_a"], value_set=period_notes),
                         pc.is_in(given["note_b"], value_set=period_notes))
        pairs = given.filter(inside)
        return pairs, {"given_pairs": len(given), "given_pairs_in_period": len(pairs)}
    return related_pairs(events, data)


def sort_for_eval(pairs: pa.Table) -> pa.Table:
    """Score descending, then note_a, then note_b: the deterministic order the evaluation reads."""
    return pairs.sort_by([("score", "descending"), ("note_a", "ascending"), ("note_b", "ascending")])


def holdout_by_source(pairs: pa.Table, fraction: float, seed: int) -> tuple[pa.Table, pa.Table, np.ndarray]:
    """(train, val, val source notes): a seeded `fraction` of source notes A moves with all its pairs to val."""
    sources = np.unique(pairs["note_a"].to_numpy(zero_copy_only=False).astype(str))
    rng = np.random.default_rng(seed)
    val_sources = np.sort(rng.choice(sources, size=int(round(fraction * len(sources))), replace=False))
    in_val = pc.is_in(pairs["note_a"], value_set=pa.array(val_sources, pa.string()))
    return pairs.filter(pc.invert(in_val)), pairs.filter(in_val), val_sources


def _subsample(pairs: pa.Table, limit: int, seed: int) -> pa.Table:
    """At most `limit` pairs (0 = all), a seeded sample kept in its original order."""
    if limit <= 0 or len(pairs) <= limit:
        return pairs
    keep = np.sort(np.random.default_rng(seed).choice(len(pairs), size=limit, replace=False))
    return pairs.take(pa.array(keep))


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat()


def note_split(notes: pa.Table, data: DataConfig) -> tuple[dict[str, int], np.ndarray]:
    """(cut-offs, per note: is it a test note)."""
    cutoffs = time_cutoffs(notes, data.test_time_quantile, data.split_scope)
    return cutoffs, notes["created_at"].to_numpy() >= note_cutoffs(notes, cutoffs)


def make_splits(notes: pa.Table, events: pa.Table, given: pa.Table, data: DataConfig
                ) -> tuple[dict[str, pa.Table], dict[str, Any], dict[str, Any]]:
    """({"train", "val", "test"} pairs, split description for split.json, counts for stats.json)."""
    cutoffs, is_test = note_split(notes, data)
    note_ids = notes["note_id"]
    train_notes, test_notes = note_ids.filter(pa.array(~is_test)), note_ids.filter(pa.array(is_test))
    train_events, test_events = period_events(events, notes, is_test, cutoffs, data.train_events_before_cutoff)
    train_period, train_counts = period_pairs(train_events, given, train_notes.combine_chunks(), data)
    test_pairs, test_counts = period_pairs(test_events, given, test_notes.combine_chunks(), data)
    event_counts = {"all": len(events), "train_period": len(train_events), "test_period": len(test_events),
                    "not_in_a_period": len(events) - len(train_events) - len(test_events)}
    return finish_splits(notes, cutoffs, is_test, train_period, test_pairs, data,
                         {"events": event_counts, "train_period_pairs": train_counts,
                          "test_period_pairs": test_counts})


def finish_splits(notes: pa.Table, cutoffs: dict[str, int], is_test: np.ndarray, train_period: pa.Table,
                  test_pairs: pa.Table, data: DataConfig, period_counts: dict[str, Any]
                  ) -> tuple[dict[str, pa.Table], dict[str, Any], dict[str, Any]]:
    """From each period's related pairs to make_splits' result (shared by the memory and Beam engines)."""
    note_ids = notes["note_id"]
    train_notes, test_notes = note_ids.filter(pa.array(~is_test)), note_ids.filter(pa.array(is_test))
    train_pairs, val_pairs, val_sources = holdout_by_source(train_period, data.val_fraction, data.seed)
    sampled = _subsample(train_pairs, data.max_train_pairs, data.seed)
    pairs = {"train": sampled, "val": sort_for_eval(val_pairs), "test": sort_for_eval(test_pairs)}
    split = {
        "scope": data.split_scope,
        "test_time_quantile": data.test_time_quantile,
        "cutoffs": cutoffs,
        "cutoffs_utc": {k: _iso(v) for k, v in cutoffs.items()},
        "train_events_before_cutoff": data.train_events_before_cutoff,
        "train_notes": train_notes.to_pylist(),
        "test_notes": test_notes.to_pylist(),
        "val_source_notes": val_sources.tolist(),
    }
    stats = {
        "notes": {"train": len(train_notes), "test": len(test_notes)},
        **period_counts,
        "val_source_notes": len(val_sources),
        "pairs": {"train_before_cap": len(train_pairs), **{name: len(t) for name, t in pairs.items()}},
        "notes_in_pairs": {name: len(pc.unique(pa.concat_arrays([t["note_a"].combine_chunks(),
                                                                  t["note_b"].combine_chunks()])))
                           for name, t in pairs.items()},
    }
    return pairs, split, stats
