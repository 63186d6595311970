"""The co-occurrence and split stages on Apache Beam (`data.engine = "beam"`), for logs of any size.

Same inputs, rules and outputs as the in-memory path (`cooccurrence.py`, `splits.py`): the Beam
pipeline replaces only the part that touches every event; its pairs and stats.json counts equal the
in-memory ones (scores to float rounding), see tests/integration/test_beam_prepare.py.

    events.parquet row groups -> slices of 65,536 rows (Reshuffle: slices spread over workers)
      -> per slice: null checks (StoreFormatError naming file and row), the event's period (test note;
         train note, before its cut-off if train_events_before_cutoff; else counted not_in_a_period),
         one fragment per (period, user) with its (note, time) touches
      -> GroupByKey (period, user): each user's whole period log, so N_u is exact
      -> BatchElements of users -> cooccurrence.cooccurrence_scores on the batch (the one definition of
         Eq. 1: strict later touch, window, each user once per pair), one element per (period, A) row
      -> CombinePerKey(RowSum): s(A->B) summed over batches per source note A
      -> bounds l <= s <= u and top-t by (score desc, B asc) on each complete row (select_related's rule)
      -> WriteToParquet, one file set per period
The driver then sorts each period's pairs into select_related's row order and finishes the splits
with splits.finish_splits (validation hold-out, train cap, evaluation order): those steps read only
the selected pairs (at most top_t per note), which fit one machine.

Hot keys:
- Power users: a user with N_u notes emits O(N_u^2) candidate pairs in one element.
  `data.beam_max_user_notes` > 0 keeps only each user's first that many distinct notes (by first touch
  in the period) and drops the user's other events (counted: skipped.power_user_events). This CHANGES
  the scores (the user's N_u becomes the cap, later notes lose the user's pairs): 0, off, is the default.
- Hot notes: a popular A's row receives partial rows from every batch. `data.beam_hot_key_fanout` > 0
  uses CombinePerKey(...).with_hot_key_fanout(n): rows are first summed under n random sub-keys, then
  the n partial rows are summed. Only the addition order changes (results equal to float rounding).

Every skipped record is counted with a Beam metrics counter (namespace "notellm_prepare") and reported
in stats.json like the in-memory path's counts.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import Metrics, MetricsFilter

from notellm_jax.config import DataConfig
from notellm_jax.data import cooccurrence, splits, store

NAMESPACE = "notellm_prepare"
SLICE_ROWS = 65_536
# Compact a row accumulator once it holds this many (B, weight) entries.
_COMPACT_AT = 1 << 16


def _counter(name: str):
    return Metrics.counter(NAMESPACE, name)


@dataclasses.dataclass(frozen=True)
class Periods:
    """How events map to periods: "all" (the cooccurrence stage) or train/test via a note table file."""
    note_table: str = ""             # parquet with note_id, is_test, cutoff; "" = one period "all"
    before_cutoff: bool = True


def _slices(path: str) -> Iterator[tuple[str, int, int]]:
    """(path, row group, first row of the group) for every row group of a parquet file."""
    with FileSystems.open(path) as f:
        meta = pq.ParquetFile(f).metadata
    offset = 0
    for group in range(meta.num_row_groups):
        yield path, group, offset
        offset += meta.row_group(group).num_rows


def _read_slices(element: tuple[str, int, int]) -> Iterator[tuple[str, int, pa.Table]]:
    """The row group's rows in slices of SLICE_ROWS, each with its file and first row number."""
    path, group, offset = element
    try:
        with FileSystems.open(path) as f:
            table = pq.ParquetFile(f).read_row_group(group, columns=list(store.EVENT_KEYS))
    except (pa.ArrowInvalid, OSError) as e:
        raise store.StoreFormatError(f"{path}: row group {group} unreadable: {e}") from None
    for start in range(0, len(table), SLICE_ROWS):
        yield path, offset + start, table.slice(start, SLICE_ROWS)


class _Fragments(beam.DoFn):
    """DoFn: one slice of events -> ((period, user), (notes, times)) per user and period, counted."""

    def __init__(self, periods: Periods):
        self.periods = periods
        self._index: dict[str, int] | None = None

    def setup(self) -> None:
        if self.periods.note_table:
            with FileSystems.open(self.periods.note_table) as f:
                table = pq.read_table(f)
            self._index = {n: i for i, n in enumerate(table["note_id"].to_pylist())}
            self._is_test = table["is_test"].to_numpy(zero_copy_only=False)
            self._cutoff = table["cutoff"].to_numpy()

    def _period_of(self, notes: np.ndarray, times: np.ndarray) -> np.ndarray:
        """Per event: 0 train, 1 test, -1 in no period (unknown note, or train event after its cut-off)."""
        if self._index is None:
            return np.zeros(len(notes), np.int64)
        row = np.fromiter((self._index.get(n, -1) for n in notes), np.int64, len(notes))
        known = row >= 0
        is_test = known & self._is_test[np.maximum(row, 0)]
        train = known & ~is_test
        if self.periods.before_cutoff:
            train &= times < self._cutoff[np.maximum(row, 0)]
        return np.where(is_test, 1, np.where(train, 0, -1))

    def process(self, element: tuple[str, int, pa.Table]) -> Iterator[Any]:
        path, first_row, table = element
        store.check_events(table, path, first_row)
        users = table["user_id"].to_numpy(zero_copy_only=False)
        notes = table["note_id"].to_numpy(zero_copy_only=False)
        times = table["timestamp"].to_numpy()
        period = self._period_of(notes, times)
        names = ("train", "test") if self._index is not None else ("all",)
        _counter("events.all").inc(len(table))
        _counter("events.not_in_a_period").inc(int((period < 0).sum()))
        for p, name in enumerate(names):
            mine = np.flatnonzero(period == p)
            _counter(f"{name}.events").inc(len(mine))
            order = mine[np.argsort(users[mine], kind="stable")]
            u = users[order]
            cuts = np.flatnonzero(u[1:] != u[:-1]) + 1
            for chunk in np.split(order, cuts) if len(order) else []:
                yield (name, users[chunk[0]]), (tuple(notes[chunk]), tuple(times[chunk].tolist()))
            for note in np.unique(notes[mine]) if len(mine) else []:
                yield beam.pvalue.TaggedOutput("notes", (name, note))


def _cap_user(notes: np.ndarray, times: np.ndarray, cap: int) -> np.ndarray:
    """Mask of the touches on the user's first `cap` distinct notes (by first touch, then note id)."""
    order = np.lexsort((notes, times))
    _, first = np.unique(notes[order], return_index=True)
    keep_notes = notes[order][np.sort(first)[:cap]]
    return np.isin(notes, keep_notes)


class _PairRows(beam.DoFn):
    """DoFn: a batch of (period, user) logs -> ((period, A), (B ids, weights)) partial rows."""

    def __init__(self, window_seconds: float | None, max_user_notes: int):
        self.window = window_seconds
        self.cap = max_user_notes

    def process(self, batch: list) -> Iterator[tuple[tuple[str, str], tuple[np.ndarray, np.ndarray]]]:
        by_period: dict[str, list] = {}
        for (period, user), fragments in batch:
            by_period.setdefault(period, []).append((user, fragments))
        for period, users in by_period.items():
            _counter(f"{period}.users").inc(len(users))
            columns = self._columns(users)
            scores = cooccurrence.cooccurrence_scores(columns, self.window)
            matrix, ids = scores.matrix, scores.note_ids
            for row in np.flatnonzero(np.diff(matrix.indptr)):
                lo, hi = matrix.indptr[row], matrix.indptr[row + 1]
                yield (period, ids[row]), (ids[matrix.indices[lo:hi]], matrix.data[lo:hi].copy())

    def _columns(self, users: list) -> dict[str, np.ndarray]:
        user_col, note_col, time_col = [], [], []
        for i, (_, fragments) in enumerate(users):
            notes = np.array([n for f in fragments for n in f[0]], dtype=object)
            times = np.array([t for f in fragments for t in f[1]], dtype=np.int64)
            if self.cap > 0 and len(set(notes)) > self.cap:
                keep = _cap_user(notes, times, self.cap)
                _counter("skipped.power_user_events").inc(int((~keep).sum()))
                notes, times = notes[keep], times[keep]
            user_col.append(np.full(len(notes), i, np.int64))
            note_col.append(notes)
            time_col.append(times)
        return {"user_id": np.concatenate(user_col), "note_id": np.concatenate(note_col),
                "timestamp": np.concatenate(time_col)}


def _sum_row(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Partial rows (B ids, weights) -> one row with unique B (sorted) and summed weights."""
    ids = np.concatenate([p[0] for p in parts])
    weights = np.concatenate([p[1] for p in parts])
    unique, inverse = np.unique(ids, return_inverse=True)
    return unique, np.bincount(inverse.ravel(), weights=weights, minlength=len(unique))


class RowSum(beam.CombineFn):
    """s(A->B) for one A: partial rows summed; the accumulator is compacted once it grows large."""

    def create_accumulator(self) -> list:
        return []

    def add_input(self, acc: list, row: tuple[np.ndarray, np.ndarray]) -> list:
        acc.append(row)
        return [_sum_row(acc)] if sum(len(p[0]) for p in acc) > _COMPACT_AT else acc

    def merge_accumulators(self, accs: Iterable[list]) -> list:
        parts = [p for acc in accs for p in acc]
        return [_sum_row(parts)] if parts else []

    def extract_output(self, acc: list) -> tuple[np.ndarray, np.ndarray]:
        return _sum_row(acc) if acc else (np.zeros(0, object), np.zeros(0))


def _select(element: tuple[tuple[str, str], tuple[np.ndarray, np.ndarray]], upper: float, lower: float,
            top_t: int) -> Iterator[dict[str, Any]]:
    """select_related's rule on one complete row: upper, lower bound, then top_t by (score desc, B asc)."""
    (period, a), (b, s) = element
    _counter(f"{period}.candidates").inc(len(s))
    keep = s <= upper
    _counter(f"{period}.after_upper").inc(int(keep.sum()))
    keep &= s >= lower
    _counter(f"{period}.after_lower").inc(int(keep.sum()))
    b, s = b[keep], s[keep]
    order = np.lexsort((b, -s))
    if top_t > 0:
        order = order[:top_t]
    _counter(f"{period}.after_top_t").inc(len(order))
    for i in order:
        yield {"period": period, "note_a": str(a), "note_b": str(b[i]), "score": float(s[i])}


def _count_note(element: tuple[str, str]) -> None:
    _counter(f"{element[0]}.notes").inc()


def _pair_record(row: dict[str, Any]) -> dict[str, Any]:
    return {"note_a": row["note_a"], "note_b": row["note_b"], "score": row["score"]}


def build(p: beam.Pipeline, events_path: str, periods: Periods, names: tuple[str, ...], data: DataConfig,
          out_dir: str) -> None:
    """Add the co-occurrence transforms (module docstring) to `p`: pairs_<period>-*.parquet in out_dir."""
    window = data.cooc_window_days * 86_400 if data.cooc_window_days > 0 else None
    fragments = (p | "Events" >> beam.Create([events_path]) | "RowGroups" >> beam.FlatMap(_slices)
                 | "Spread" >> beam.Reshuffle() | "Slices" >> beam.FlatMap(_read_slices)
                 | "Fragments" >> beam.ParDo(_Fragments(periods)).with_outputs("notes", main="users"))
    _ = fragments.notes | "DistinctNotes" >> beam.Distinct() | "CountNotes" >> beam.Map(_count_note)
    combine = beam.CombinePerKey(RowSum())
    if data.beam_hot_key_fanout > 0:
        combine = combine.with_hot_key_fanout(data.beam_hot_key_fanout)
    selected = (fragments.users | "PerUser" >> beam.GroupByKey()
                | "UserBatches" >> beam.BatchElements(min_batch_size=16, max_batch_size=4096)
                | "PairRows" >> beam.ParDo(_PairRows(window, data.beam_max_user_notes))
                | "Scores" >> combine
                | "Select" >> beam.FlatMap(_select, data.cooc_upper, data.cooc_lower, data.cooc_top_t))
    for name in names:
        _ = (selected | f"Only_{name}" >> beam.Filter(lambda row, n=name: row["period"] == n)
             | f"Record_{name}" >> beam.Map(_pair_record)
             | f"Write_{name}" >> beam.io.WriteToParquet(f"{out_dir}/pairs_{name}", store.PAIRS_SCHEMA,
                                                         file_name_suffix=".parquet"))


def _options(data: DataConfig):
    from apache_beam.options.pipeline_options import PipelineOptions

    return PipelineOptions(flags=list(data.beam_options), runner=data.beam_runner)


def _counters(result) -> dict[str, int]:
    counts: dict[str, int] = {}
    for c in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]:
        counts[c.key.metric.name] = counts.get(c.key.metric.name, 0) + int(c.committed or 0)
    return counts


def _read_period(out_dir: Path, name: str) -> pa.Table:
    """The period's pairs in select_related's order: note_a, score descending, note_b."""
    files = sorted(out_dir.glob(f"pairs_{name}-*.parquet"))
    tables = [store.to_table(pq.read_table(f), store.PAIRS_SCHEMA, str(f)) for f in files]
    table = pa.concat_tables(tables) if tables else store.to_table(
        {"note_a": [], "note_b": [], "score": []}, store.PAIRS_SCHEMA)
    return table.sort_by([("note_a", "ascending"), ("score", "descending"), ("note_b", "ascending")])


def run(events_path: Path, periods: Periods, names: tuple[str, ...], data: DataConfig, work_dir: Path
        ) -> tuple[dict[str, pa.Table], dict[str, int]]:
    """Run the pipeline; ({period: pairs}, metrics counters). work_dir holds its files (replaced)."""
    out_dir = work_dir / "out"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    p = beam.Pipeline(options=_options(data))
    build(p, str(events_path), periods, names, data, str(out_dir))
    try:
        result = p.run()
        result.wait_until_finish()
    except Exception as e:  # the runner wraps worker errors; surface the store's own error
        if "StoreFormatError" in str(e):
            message = str(e).split("StoreFormatError: ", 1)[1].split("\n", 1)[0].split(" [while running")[0]
            raise store.StoreFormatError(message) from None
        raise
    return {name: _read_period(out_dir, name) for name in names}, _counters(result)


def _pair_counts(counters: dict[str, int], name: str) -> dict[str, int]:
    """related_pairs' counts of one period, from the counters."""
    keys = ("events", "users", "notes", "candidates", "after_upper", "after_lower", "after_top_t")
    return {k: counters.get(f"{name}.{k}", 0) for k in keys}


def _skipped(counters: dict[str, int]) -> dict[str, int]:
    return {k.split(".", 1)[1]: v for k, v in sorted(counters.items()) if k.startswith("skipped.")}


def related_pairs(events_path: Path, data: DataConfig, work_dir: Path) -> tuple[pa.Table, dict[str, Any]]:
    """cooccurrence.related_pairs over the whole events file, on Beam."""
    start = time.perf_counter()
    pairs, counters = run(events_path, Periods(), ("all",), data, work_dir)
    counts: dict[str, Any] = _pair_counts(counters, "all")
    if _skipped(counters):
        counts["skipped"] = _skipped(counters)
    counts["beam_seconds"] = round(time.perf_counter() - start, 3)
    return pairs["all"], counts


def make_splits(notes: pa.Table, events_path: Path, data: DataConfig, work_dir: Path
                ) -> tuple[dict[str, pa.Table], dict[str, Any], dict[str, Any]]:
    """splits.make_splits (co-occurrence sources) with the period pairs computed on Beam."""
    cutoffs, is_test = splits.note_split(notes, data)
    note_table = work_dir / "note_periods.parquet"
    work_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"note_id": notes["note_id"], "is_test": pa.array(is_test),
                             "cutoff": pa.array(splits.note_cutoffs(notes, cutoffs))}), note_table)
    periods = Periods(note_table=str(note_table), before_cutoff=data.train_events_before_cutoff)
    pairs, counters = run(events_path, periods, ("train", "test"), data, work_dir)
    events = {"all": counters.get("events.all", 0), "train_period": counters.get("train.events", 0),
              "test_period": counters.get("test.events", 0),
              "not_in_a_period": counters.get("events.not_in_a_period", 0)}
    counts: dict[str, Any] = {"events": events, "train_period_pairs": _pair_counts(counters, "train"),
                              "test_period_pairs": _pair_counts(counters, "test")}
    if _skipped(counters):
        counts["skipped"] = _skipped(counters)
    return splits.finish_splits(notes, cutoffs, is_test, pairs["train"], pairs["test"], data, counts)
