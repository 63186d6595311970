"""The co-occurrence and split stages on Apache Beam (`data.engine = "beam"`), for logs of any size.

Same inputs, rules and outputs as the in-memory path (`cooccurrence.py`, `splits.py`): the Beam
pipeline replaces only the part that touches every event; its pairs and stats.json counts equal the
in-memory ones (scores bit for bit), see tests/integration/test_beam_prepare.py.

    events.parquet row groups -> slices of 65,536 rows (Reshuffle: slices spread over workers)
      -> per slice: null/type checks (StoreFormatError naming file and row), the event's period (test
         note; train note, before its cut-off if train_events_before_cutoff; else counted
         not_in_a_period), its events per (period, user bucket) -- stable_bucket(user) % B, B = events / 200k,
         so a user's whole period log lands in one bucket and N_u is exact
      -> GroupByKey (period, user bucket)
      -> per bucket: cooccurrence.cooccurrence_scores (the one definition of Eq. 1: strict later touch,
         window, each user once per pair), its (A, B, 1/N_u sums) split by A's note shard stable_bucket(A) % B
      -> CombinePerKey(PairSum): s(A->B) per note shard, summed over buckets (exact: WEIGHT_QUANTUM)
      -> per shard (complete rows of its notes A): cooccurrence.select_coo, select_related's rule
         (l <= s <= u, then top-t by score desc, B asc) -> WriteToParquetBatched, one file set per period

Work is vectorised per slice, bucket and shard (numpy/Arrow), not per event: Python-per-element costs
are what make naive Beam pipelines slow. Ids travel between stages as Arrow string arrays (pickled as
a few buffers; numpy object arrays pickle string by string) and are sorted/deduplicated by Arrow.

The driver then sorts each period's pairs into select_related's row order and finishes the splits
with splits.finish_splits (validation hold-out, train cap, evaluation order): those steps read only
the selected pairs (at most top_t per note), which fit one machine.

Hot keys:
- Power users: a user with N_u notes makes O(N_u^2) candidate pairs inside one bucket.
  `data.beam_max_user_notes` > 0 keeps only each user's first that many distinct notes (by first touch
  in the period) and drops the user's other events (counted: skipped.power_user_events). This CHANGES
  the scores (the user's N_u becomes the cap, later notes lose the user's pairs): 0, off, is the default.
- Power users, split instead (both engines): `data.cooc_user_split_events` = k > 0 scores each user's
  log in time-ordered chunks of k events, each chunk as a user (cooccurrence.split_users, applied inside
  cooccurrence_scores, so both engines split alike and stay equal). A bucket's work per user is then
  at most k^2 candidate pairs. This also CHANGES scores: a split user's pairs across chunks are lost
  and each chunk weighs 1/N_chunk (its own distinct notes) instead of 1/N_u; users with <= k events
  are untouched; nothing is dropped, so no count is skipped.
- Hot notes: a popular A's shard receives partial scores from every bucket. `data.beam_hot_key_fanout`
  > 0 uses CombinePerKey(...).with_hot_key_fanout(n): a shard's partials are first summed under n
  random sub-keys on different workers, then the n partial sums are summed. Only the order of
  additions changes, and the sums are exact (cooccurrence.WEIGHT_QUANTUM): results are identical.

Every skipped record is counted with a Beam metrics counter (namespace "notellm_prepare") and reported
in stats.json like the in-memory path's counts.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import Metrics, MetricsFilter

from notellm_jax.config import DataConfig
from notellm_jax.data import cooccurrence, splits, store

NAMESPACE = "notellm_prepare"
SLICE_ROWS = 65_536
# Compact a score accumulator once it holds this many (A, B, weight) entries.
_COMPACT_AT = 1 << 20
# Users are hashed into buckets of about this many events (a bucket's pairs are computed at once).
EVENTS_PER_BUCKET = 200_000


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


_FNV_PRIME = np.uint64(0x100000001B3)


def stable_bucket(ids: pa.Array, buckets: int) -> np.ndarray:
    """hash(id) % buckets, the same on every worker (Python's str hash is salted per process): the sum
    of byte_i * P^i mod 2^64 over the id's UTF-8 bytes (P = the FNV prime), then a splitmix64 finaliser;
    vectorised over the Arrow buffers (a Python crc32 per id cost a third of the pipeline's CPU)."""
    ids = pc.cast(ids, pa.large_string())  # int64 offsets whatever the input
    offsets = np.frombuffer(ids.buffers()[1], np.int64)[ids.offset:ids.offset + len(ids) + 1]
    data = np.frombuffer(ids.buffers()[2] or b"", np.uint8)[offsets[0]:offsets[-1]]
    starts, lengths = offsets[:-1] - offsets[0], np.diff(offsets)
    position = np.arange(len(data)) - np.repeat(starts, lengths)
    with np.errstate(over="ignore"):
        powers = np.cumprod(np.full(max(int(lengths.max(initial=0)), 1), _FNV_PRIME))  # P^1, P^2, ...
        powers = np.concatenate([[np.uint64(1)], powers[:-1]])                        # P^0, P^1, ...
        total = np.concatenate([[np.uint64(0)], np.cumsum(data.astype(np.uint64) * powers[position])])
        h = total[starts + lengths] - total[starts]
        for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
            h = (h ^ (h >> np.uint64(shift))) * np.uint64(mult)
        h ^= h >> np.uint64(31)
    return (h % np.uint64(buckets)).astype(np.int64)


def _groups(keys: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(key, its positions) per distinct key, by one stable sort (not one full scan per key)."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.append(True, sorted_keys[1:] != sorted_keys[:-1])) if len(keys) else []
    for lo, hi in zip(starts, [*starts[1:], len(keys)]):
        yield int(sorted_keys[lo]), order[lo:hi]


class _Fragments(beam.DoFn):
    """One slice of events -> its events per (period, user bucket), and its distinct notes per
    (period, note shard) on the "notes" output; counted."""

    def __init__(self, periods: Periods, buckets: int):
        self.periods = periods
        self.buckets = buckets
        self._note_ids: pa.Array | None = None

    def setup(self) -> None:
        if self.periods.note_table:
            with FileSystems.open(self.periods.note_table) as f:
                table = pq.read_table(f)
            self._note_ids = table["note_id"].combine_chunks()
            self._is_test = table["is_test"].to_numpy(zero_copy_only=False)
            self._cutoff = table["cutoff"].to_numpy()

    def _period_of(self, notes: pa.Array, times: np.ndarray) -> np.ndarray:
        """Per event: 0 train, 1 test, -1 in no period (unknown note, or train event after its cut-off)."""
        if self._note_ids is None:
            return np.zeros(len(notes), np.int64)
        row = pc.fill_null(pc.index_in(notes, value_set=self._note_ids), -1).to_numpy().astype(np.int64)
        known = row >= 0
        is_test = known & self._is_test[np.maximum(row, 0)]
        train = known & ~is_test
        if self.periods.before_cutoff:
            train &= times < self._cutoff[np.maximum(row, 0)]
        return np.where(is_test, 1, np.where(train, 0, -1))

    def process(self, element: tuple[str, int, pa.Table]) -> Iterator[Any]:
        path, first_row, table = element
        store.check_events(table, path, first_row)
        # Ids stay Arrow arrays: they pickle as buffers between workers, object arrays string by string.
        users, notes = table["user_id"].combine_chunks(), table["note_id"].combine_chunks()
        times = table["timestamp"].to_numpy()
        period = self._period_of(notes, times)
        _counter("events.all").inc(len(table))
        _counter("events.not_in_a_period").inc(int((period < 0).sum()))
        bucket = stable_bucket(users, self.buckets)
        for p, name in enumerate(("train", "test") if self._note_ids is not None else ("all",)):
            mine = period == p
            _counter(f"{name}.events").inc(int(mine.sum()))
            mine = np.flatnonzero(mine)
            for b, rows in _groups(bucket[mine]):
                rows = mine[rows]
                yield (name, b), (users.take(pa.array(rows)), notes.take(pa.array(rows)), times[rows])
            distinct = pc.unique(notes.take(pa.array(mine)))
            for b, rows in _groups(stable_bucket(distinct, self.buckets)):
                yield beam.pvalue.TaggedOutput("notes", ((name, b), distinct.take(pa.array(rows))))


def cap_user_notes(user: np.ndarray, note: np.ndarray, time: np.ndarray, cap: int) -> np.ndarray:
    """Mask of the events on each user's first `cap` distinct notes (by first touch, then note id)."""
    order = np.lexsort((time, note, user))
    u, n = user[order], note[order]
    first = np.append(True, (u[1:] != u[:-1]) | (n[1:] != n[:-1]))   # first touch of each (user, note)
    rows = order[first]
    rows = rows[np.lexsort((note[rows], time[rows], user[rows]))]    # per user by first touch, note id
    ru = user[rows]
    start = np.flatnonzero(np.append(True, ru[1:] != ru[:-1]))
    rank = np.arange(len(rows)) - np.repeat(start, np.diff(np.append(start, len(rows))))
    kept = set(zip(user[rows[rank < cap]].tolist(), note[rows[rank < cap]].tolist()))
    return np.fromiter(((a, b) in kept for a, b in zip(user.tolist(), note.tolist())), bool, len(user))


class _BucketPairs(beam.DoFn):
    """All events of one (period, user bucket) -> partial scores per (period, A's note shard)."""

    def __init__(self, window_seconds: float | None, max_user_notes: int, split_events: int, shards: int):
        self.window = window_seconds
        self.cap = max_user_notes
        self.split_events = split_events
        self.shards = shards

    def process(self, element: tuple[tuple[str, int], Iterable[tuple]]) -> Iterator[Any]:
        (period, _), fragments = element
        parts = list(fragments)
        events = pa.table({"user_id": pa.concat_arrays([f[0] for f in parts]),
                           "note_id": pa.concat_arrays([f[1] for f in parts]),
                           "timestamp": np.concatenate([f[2] for f in parts])})
        if self.cap > 0:
            user, note = (events[k].to_numpy(zero_copy_only=False) for k in ("user_id", "note_id"))
            keep = cap_user_notes(user, note, events["timestamp"].to_numpy(), self.cap)
            _counter("skipped.power_user_events").inc(int((~keep).sum()))
            events = events.filter(pa.array(keep))
        scores = cooccurrence.cooccurrence_scores(events, self.window, split_events=self.split_events)
        _counter(f"{period}.users").inc(scores.num_users)
        coo = scores.matrix.tocoo()
        ids = pa.array(scores.note_ids, pa.string())
        for s, rows in _groups(stable_bucket(ids, self.shards)[coo.row]):
            a, b = pa.array(coo.row[rows]), pa.array(coo.col[rows])
            yield (period, s), (ids.take(a), ids.take(b), coo.data[rows])


def _sum_pairs(parts: list[tuple[pa.Array, pa.Array, np.ndarray]]) -> tuple[pa.Array, pa.Array, np.ndarray]:
    """Partial (A, B, weight) triples -> one per distinct (A, B) with the weights summed (exact, any order)."""
    table = pa.table({"a": pa.concat_arrays([p[0] for p in parts]), "b": pa.concat_arrays([p[1] for p in parts]),
                      "w": np.concatenate([p[2] for p in parts])})
    summed = table.group_by(["a", "b"]).aggregate([("w", "sum")])
    return summed["a"].combine_chunks(), summed["b"].combine_chunks(), summed["w_sum"].to_numpy()


class PairSum(beam.CombineFn):
    """s(A->B) for the notes A of one shard: partial triples summed, compacted once they grow large."""

    def create_accumulator(self) -> list:
        return []

    def add_input(self, acc: list, part: tuple) -> list:
        acc.append(part)
        return [_sum_pairs(acc)] if len(acc) > 1 and sum(len(p[0]) for p in acc) > _COMPACT_AT else acc

    def merge_accumulators(self, accs: Iterable[list]) -> list:
        parts = [p for acc in accs for p in acc]
        return [_sum_pairs(parts)] if parts else []

    def extract_output(self, acc: list) -> tuple[pa.Array, pa.Array, np.ndarray]:
        empty = pa.array([], pa.string())
        return _sum_pairs(acc) if acc else (empty, empty, np.zeros(0))


def _select(element: tuple[tuple[str, int], tuple], upper: float, lower: float, top_t: int
            ) -> Iterator[tuple[str, pa.Table]]:
    """cooccurrence.select_coo on one shard's complete rows; its counts go to the counters."""
    (period, _), (a, b, s) = element
    both = pa.concat_arrays([a, b])
    ids = pc.unique(both)
    ids = ids.take(pc.array_sort_indices(ids))  # Arrow sorts strings by UTF-8 bytes = code points, as Python
    codes = pc.index_in(both, value_set=ids).to_numpy().astype(np.int64)  # codes sort like the ids
    ka, kb, ks, counts = cooccurrence.select_coo(codes[:len(a)], codes[len(a):], s, upper, lower, top_t)
    for name, value in counts.items():
        _counter(f"{period}.{name}").inc(value)
    yield period, pa.table({"note_a": ids.take(pa.array(ka)), "note_b": ids.take(pa.array(kb)),
                            "score": pa.array(ks, pa.float64())})


class NoteUnion(beam.CombineFn):
    """The distinct note ids of one (period, note shard)."""

    def create_accumulator(self) -> pa.Array:
        return pa.array([], pa.string())

    def add_input(self, acc: pa.Array, ids: pa.Array) -> pa.Array:
        return pc.unique(pa.concat_arrays([acc, ids]))

    def merge_accumulators(self, accs: Iterable[pa.Array]) -> pa.Array:
        accs = list(accs)
        return pc.unique(pa.concat_arrays(accs)) if accs else self.create_accumulator()

    def extract_output(self, acc: pa.Array) -> int:
        return len(acc)


def _count_notes(element: tuple[tuple[str, int], int]) -> None:
    _counter(f"{element[0][0]}.notes").inc(element[1])


def num_buckets(events_path: str) -> int:
    """User buckets (= note shards): about EVENTS_PER_BUCKET events each, from the parquet metadata."""
    with FileSystems.open(events_path) as f:
        rows = pq.ParquetFile(f).metadata.num_rows
    return max(1, -(-rows // EVENTS_PER_BUCKET))


def build(p: beam.Pipeline, events_path: str, periods: Periods, names: tuple[str, ...], data: DataConfig,
          out_dir: str) -> None:
    """Add the co-occurrence transforms (module docstring) to `p`: pairs_<period>-*.parquet in out_dir."""
    window = data.cooc_window_days * 86_400 if data.cooc_window_days > 0 else None
    buckets = num_buckets(events_path)
    fragments = (p | "Events" >> beam.Create([events_path]) | "RowGroups" >> beam.FlatMap(_slices)
                 | "Spread" >> beam.Reshuffle() | "Slices" >> beam.FlatMap(_read_slices)
                 | "Fragments" >> beam.ParDo(_Fragments(periods, buckets)).with_outputs("notes", main="users"))
    _ = (fragments.notes | "DistinctNotes" >> beam.CombinePerKey(NoteUnion())
         | "CountNotes" >> beam.Map(_count_notes))
    combine = beam.CombinePerKey(PairSum())
    if data.beam_hot_key_fanout > 0:
        combine = combine.with_hot_key_fanout(data.beam_hot_key_fanout)
    selected = (fragments.users | "PerUserBucket" >> beam.GroupByKey()
                | "Pairs" >> beam.ParDo(_BucketPairs(window, data.beam_max_user_notes, data.cooc_user_split_events,
                                                    buckets))
                | "Scores" >> combine
                | "Select" >> beam.FlatMap(_select, data.cooc_upper, data.cooc_lower, data.cooc_top_t))
    for name in names:
        _ = (selected | f"Only_{name}" >> beam.Filter(lambda row, n=name: row[0] == n)
             | f"Table_{name}" >> beam.Map(lambda row: row[1])
             | f"Write_{name}" >> beam.io.WriteToParquetBatched(f"{out_dir}/pairs_{name}", store.PAIRS_SCHEMA,
                                                                file_name_suffix=".parquet"))


def _options(data: DataConfig):
    from apache_beam.options.pipeline_options import PipelineOptions  # Apache Beam: only for data.engine=beam

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
