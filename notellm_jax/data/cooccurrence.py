"""Co-occurrence scores from a behaviour log and the related-note pairs they select (METHOD.md 2).

    s(A->B) = sum over users u who touched A and later touched B of 1 / N_u

- N_u is the number of distinct notes u touched in the log given (the paper's "notes that user
  clicked"); the 1/N_u weight damps hyperactive users.
- "Later" is strict: u counts for (A, B) if some touch of B has a timestamp strictly greater than
  some touch of A (and at most `window_seconds` greater, if a window is set). Touches with equal
  timestamps are not ordered, so they do not pair (old dumps store favourites by day only: two
  favourites on one day do not pair).
- Repeated touches count once: u adds 1/N_u to s(A->B) at most once however often u touched A or B.
  A user who touched A, then B, then A again contributes to both s(A->B) and s(B->A).
- A != B always; users with a single note contribute nothing (but their events count in stats).
- Each 1/N_u is rounded to a multiple of 2^-32 (WEIGHT_QUANTUM, about 2.3e-10) before summing. Sums of
  such numbers below 2^21 are exact in float64, so s(A->B) does not depend on the order of summation:
  this path and the Beam path (beam_prepare.py), which adds in whatever order its workers finish,
  give bit-identical scores, hence identical bounds, ranks and top-t ties.

Vectorised with numpy: user and note ids are dictionary-encoded by Arrow (two threads); users with a
single event are dropped; events are sorted by (user, note, time) as one packed int64 key; all
candidate (A, B) positions of a user are generated with `np.repeat` arithmetic in chunks of whole
users (bounded memory), filtered, and summed into a scipy.sparse CSR matrix; the selection orders
pairs by one packed (A, score rank) key. No Python loop runs over pairs or events.
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from notellm_jax.config import DataConfig
from notellm_jax.data import store

# Upper bound on candidate pairs materialised at once (about 16 bytes each in the main arrays).
DEFAULT_CHUNK_PAIRS = 1 << 23
# Weights 1/N_u are multiples of this (see the module docstring: order-independent exact sums).
WEIGHT_QUANTUM = 2.0 ** -32


def user_weight(num_notes: np.ndarray) -> np.ndarray:
    """1/N_u rounded to a multiple of WEIGHT_QUANTUM."""
    return np.round(1.0 / (num_notes * WEIGHT_QUANTUM)) * WEIGHT_QUANTUM


@dataclasses.dataclass(frozen=True)
class CooccurrenceScores:
    """s(A->B) as a CSR matrix: row A, column B, indices into `note_ids` (sorted ascending)."""
    matrix: sp.csr_matrix
    note_ids: np.ndarray
    num_users: int
    num_events: int


@dataclasses.dataclass(frozen=True)
class _Touches:
    """Events sorted by (user, note, time) with their distinct (user, note) rows."""
    user: np.ndarray         # per event, sorted
    time: np.ndarray         # per event
    row: np.ndarray          # per event: index of its (user, note) row
    row_user: np.ndarray     # per row
    row_note: np.ndarray     # per row
    row_first: np.ndarray    # per row: first touch time
    row_last: np.ndarray     # per row: last touch time
    row_weight: np.ndarray   # per row: 1 / N_u of the row's user
    row_user_start: np.ndarray  # per row: first row of the same user
    row_user_count: np.ndarray  # per row: N_u


def _encode(events: pa.Table | Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(user index, note index, timestamp, sorted note ids); note indices follow the sorted ids."""
    columns = {}
    for name in ("user_id", "note_id", "timestamp"):
        if name not in (events.column_names if isinstance(events, pa.Table) else events):
            raise ValueError(f"events: missing column {name!r}")
        column = events[name]
        columns[name] = column if isinstance(column, pa.ChunkedArray) else pa.chunked_array([pa.array(column)])
    if len(columns["user_id"]) == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty, np.zeros(0, object)
    # Hashing the ids is a third of the run; Arrow releases the GIL, so the two columns encode in parallel.
    with ThreadPoolExecutor(2) as pool:
        users, notes = pool.map(lambda c: pc.dictionary_encode(c).combine_chunks(),
                                (columns["user_id"], columns["note_id"]))
    note_ids = notes.dictionary.to_numpy(zero_copy_only=False)
    order = pc.array_sort_indices(notes.dictionary).to_numpy()  # Arrow: no Python string comparisons
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    note_index = rank[notes.indices.to_numpy(zero_copy_only=False)]
    times = columns["timestamp"].to_numpy().astype(np.int64)
    return users.indices.to_numpy(zero_copy_only=False).astype(np.int64), note_index, times, note_ids[order]


def _sort_packed(columns: list[np.ndarray]) -> list[np.ndarray]:
    """Non-negative int64 columns, rows sorted by (columns[0], columns[1], ...).

    Sorting one packed int64 key by value is ~10x faster than np.lexsort over three keys (which does an
    indirect merge sort per key: 10M events took 11 s); when the fields do not fit 63 bits, lexsort."""
    bits = [max(int(c.max()).bit_length(), 1) for c in columns]
    if sum(bits) > 63:
        order = np.lexsort(columns[::-1])
        return [c[order] for c in columns]
    key = columns[0].copy()
    for column, width in zip(columns[1:], bits[1:]):
        key = (key << width) | column
    key.sort()
    out = []
    for width in bits[::-1]:
        out.append(key & ((1 << width) - 1))
        key = key >> width
    return out[::-1]


def _sorted_rows(user: np.ndarray, note: np.ndarray, time: np.ndarray) -> tuple[np.ndarray, ...]:
    """(user, note, time) per event in (user, note, time) order."""
    t0 = int(time.min())
    user, note, time = _sort_packed([user, note, time - t0])
    return user, note, time + t0


def split_users(user: np.ndarray, note: np.ndarray, time: np.ndarray, events: int) -> tuple[np.ndarray, ...]:
    """data.cooc_user_split_events: each user's events in (time, note) order cut into consecutive chunks
    of `events` events, each chunk a user of its own (dense indices); arrays returned in that order."""
    t0 = int(time.min())
    user, time, note = _sort_packed([user, time - t0, note])
    start = np.flatnonzero(np.append(True, user[1:] != user[:-1]))
    rank = np.arange(len(user)) - np.repeat(start, np.diff(np.append(start, len(user))))
    chunk = rank // events
    new = np.append(True, (user[1:] != user[:-1]) | (chunk[1:] != chunk[:-1]))
    return np.cumsum(new) - 1, note, time + t0


def _multi_event_users(user: np.ndarray, note: np.ndarray, time: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The events of users with more than one event, users renumbered densely. A user with one event
    has one note and makes no pair; most users of a power-law log are such (they are dropped before
    the sort: about half the events of bench/cooccurrence.py's synthetic log)."""
    events_per_user = np.bincount(user)
    keep = events_per_user[user] > 1
    return (np.cumsum(events_per_user > 1) - 1)[user[keep]], note[keep], time[keep]


def _touches(user: np.ndarray, note: np.ndarray, time: np.ndarray) -> _Touches:
    user, note, time = _sorted_rows(user, note, time)
    new_row = np.ones(len(user), bool)
    new_row[1:] = (user[1:] != user[:-1]) | (note[1:] != note[:-1])
    row_start = np.flatnonzero(new_row)
    row_end = np.append(row_start[1:], len(user))
    row_user = user[row_start]
    new_user = np.ones(len(row_start), bool)
    new_user[1:] = row_user[1:] != row_user[:-1]
    user_start = np.flatnonzero(new_user)
    user_count = np.diff(np.append(user_start, len(row_start)))
    user_of_row = np.cumsum(new_user) - 1
    return _Touches(user=user, time=time, row=np.cumsum(new_row) - 1, row_user=row_user, row_note=note[row_start],
                    row_first=time[row_start], row_last=time[row_end - 1],
                    row_weight=user_weight(user_count)[user_of_row], row_user_start=user_start[user_of_row],
                    row_user_count=user_count[user_of_row])


def _expand(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For items i with ranges [starts[i], starts[i] + counts[i]): (item index, position) per element."""
    item = np.repeat(np.arange(len(counts)), counts)
    offsets = np.arange(len(item)) - np.repeat(np.cumsum(counts) - counts, counts)
    return item, starts[item] + offsets


def _chunks(item_user: np.ndarray, counts: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Split items (grouped by user) into [lo, hi) ranges of whole users with about `budget` elements each."""
    if len(counts) == 0:
        return []
    user_end = np.append(np.flatnonzero(item_user[1:] != item_user[:-1]) + 1, len(item_user))
    bins = np.cumsum(counts)[user_end - 1] // max(budget, 1)
    ends = user_end[np.append(np.flatnonzero(bins[1:] != bins[:-1]), len(bins) - 1)]
    return list(zip(np.append(0, ends[:-1]).tolist(), ends.tolist()))


def _unbounded_pairs(t: _Touches, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """(row A, row B) for rows lo..hi: every other note of the user touched last after A's first touch."""
    rows = np.arange(lo, hi)
    item, row_b = _expand(t.row_user_start[rows], t.row_user_count[rows])
    row_a = rows[item]
    keep = (row_a != row_b) & (t.row_first[row_a] < t.row_last[row_b])
    return row_a[keep], row_b[keep]


def _window_pairs(t: _Touches, by_time: np.ndarray, later: tuple[np.ndarray, np.ndarray], lo: int, hi: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(row A, row B), deduplicated, for events lo..hi in (user, time) order: B touched in (t_A, t_A + w]."""
    events = np.arange(lo, hi)
    later_start = later[0][events]
    item, partner = _expand(later_start, later[1][events] - later_start)
    row_a, row_b = t.row[by_time[events[item]]], t.row[by_time[partner]]
    keep = row_a != row_b
    keys = np.unique(row_a[keep] * len(t.row_note) + row_b[keep])
    return keys // len(t.row_note), keys % len(t.row_note)


def _window_ranges(t: _Touches, window_seconds: float) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Events in (user, time) order and, per event, the [start, end) range of same-user events in (t, t + w]."""
    by_time = np.lexsort((t.time, t.user))
    user, time = t.user[by_time], t.time[by_time] - t.time.min()
    window = int(np.floor(window_seconds))
    span = int(time.max()) + window + 1
    if int(user.max()) + 1 > np.iinfo(np.int64).max // span:
        raise ValueError(f"window_seconds={window_seconds} is too large for int64 time keys; use None")
    key = user * span + time
    return by_time, (np.searchsorted(key, key, "right"), np.searchsorted(key, key + window, "right"))


def cooccurrence_scores(events: pa.Table | Mapping[str, Any], window_seconds: float | None = None,
                        chunk_pairs: int = DEFAULT_CHUNK_PAIRS, split_events: int = 0) -> CooccurrenceScores:
    """s(A->B) for every ordered pair of notes (rules in the module docstring).

    events: a Table or dict of arrays with user_id, note_id, timestamp (int seconds; extra columns
    ignored). window_seconds: B must follow A by at most this much (None or <= 0: unbounded).
    chunk_pairs bounds the candidate pairs held in memory at once (a chunk always holds whole users).
    split_events > 0 scores each user's log in time-ordered chunks of that many events, each chunk as a
    user (split_users; this changes the scores of users with more events; num_users counts real users).
    """
    user, note, time, note_ids = _encode(events)
    n = len(note_ids)
    if n == 0:
        return CooccurrenceScores(sp.csr_matrix((0, 0)), note_ids, 0, 0)
    # user holds dictionary indices 0..k-1, every one used: k = max + 1 (np.unique cost 15% of the run).
    num_users, num_events = int(user.max()) + 1, len(user)
    if split_events > 0:
        user, note, time = split_users(user, note, time, split_events)
    active = _multi_event_users(user, note, time)
    if len(active[0]) == 0:
        return CooccurrenceScores(sp.csr_matrix((n, n)), note_ids, num_users, num_events)
    t = _touches(*active)
    if window_seconds is None or window_seconds <= 0:
        ranges = _chunks(t.row_user, t.row_user_count, chunk_pairs)
        pair_chunks = (_unbounded_pairs(t, lo, hi) for lo, hi in ranges)
    else:
        by_time, later = _window_ranges(t, window_seconds)
        ranges = _chunks(t.user[by_time], later[1] - later[0], chunk_pairs)
        pair_chunks = (_window_pairs(t, by_time, later, lo, hi) for lo, hi in ranges)
    parts = [sp.csr_matrix((t.row_weight[a], (t.row_note[a], t.row_note[b])), shape=(n, n))
             for a, b in pair_chunks]
    matrix = _tree_sum(parts) if parts else sp.csr_matrix((n, n))
    return CooccurrenceScores(matrix=matrix, note_ids=note_ids, num_users=num_users, num_events=num_events)


def _tree_sum(parts: list[sp.csr_matrix]) -> sp.csr_matrix:
    """Sum sparse matrices pairwise (sequential summing would re-copy the growing total per chunk)."""
    while len(parts) > 1:
        parts = [parts[i] + parts[i + 1] if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
    return parts[0].tocsr()


def select_related(scores: CooccurrenceScores, upper: float, lower: float, top_t: int
                   ) -> tuple[pa.Table, dict[str, int]]:
    """Related pairs: drop s > upper and s < lower, then keep each A's top_t by score (0 = no cap).

    Ties in score are broken by B's note id (ascending), so the result is deterministic. Returns the
    pairs (note_a, note_b, score; sorted by A, score desc, B) and the pair counts after each filter.
    """
    coo = scores.matrix.tocoo()
    a, b, s, counts = select_coo(coo.row.astype(np.int64), coo.col.astype(np.int64), coo.data, upper, lower, top_t)
    ids = pc.cast(pa.array(scores.note_ids), pa.string())  # Arrow take: no per-pair Python strings
    pairs = store.to_table({"note_a": ids.take(pa.array(a)), "note_b": ids.take(pa.array(b)), "score": s},
                           store.PAIRS_SCHEMA, "related pairs")
    return pairs, counts


def _descending_rank(s: np.ndarray) -> tuple[np.ndarray, int]:
    """Per score an int64 in [0, size) that orders like -s; and size. Co-occurrence scores are multiples
    of WEIGHT_QUANTUM, so the multiple itself serves (no search); other scores get their dense rank."""
    q = s / WEIGHT_QUANTUM
    if np.array_equal(np.rint(q), q) and np.abs(q).max() < 2 ** 53:
        q = q.astype(np.int64)
        return int(q.max()) - q, int(q.max() - q.min()) + 1
    values = np.unique(s)
    return len(values) - 1 - np.searchsorted(values, s), len(values)


def _row_score_order(a: np.ndarray, b: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The permutation to (a, s descending, b) order, as np.lexsort((b, -s, a)) but about 30x faster at
    10^7 pairs: sort by the unique (a, b) key (skipped when given so, as CSR rows are), then stably by
    (a, descending rank of s) packed into one int64 (lexsort if that does not fit)."""
    if len(a) == 0:
        return np.zeros(0, np.int64)
    ab = a * (int(b.max()) + 1) + b
    order = np.arange(len(a)) if bool(np.all(ab[1:] > ab[:-1])) else np.argsort(ab)
    rank, size = _descending_rank(s[order])
    if (int(a.max()) + 1) * size >= 2 ** 63:
        return np.lexsort((b, -s, a))
    return order[np.argsort(a[order] * size + rank, kind="stable")]


def select_coo(a: np.ndarray, b: np.ndarray, s: np.ndarray, upper: float, lower: float, top_t: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """select_related on (A, B, score) arrays whose integer codes sort like the note ids; the kept
    triples in (A, score desc, B) order and the counts. The Beam engine selects with this too."""
    counts = {"candidates": len(s)}
    keep = s <= upper
    counts["after_upper"] = int(keep.sum())
    keep &= s >= lower
    counts["after_lower"] = int(keep.sum())
    a, b, s = a[keep], b[keep], s[keep]
    order = _row_score_order(a, b, s)
    a, b, s = a[order], b[order], s[order]
    group_start = np.flatnonzero(np.append(True, a[1:] != a[:-1])) if len(a) else np.zeros(0, np.int64)
    rank = np.arange(len(a)) - np.repeat(group_start, np.diff(np.append(group_start, len(a))))
    keep = rank < top_t if top_t > 0 else np.ones(len(a), bool)
    counts["after_top_t"] = int(keep.sum())
    return a[keep], b[keep], s[keep], counts


def related_pairs(events: pa.Table | Mapping[str, Any], data: DataConfig) -> tuple[pa.Table, dict[str, int]]:
    """cooccurrence_scores + select_related with config.data's window, bounds and top-t; pairs and counts."""
    window = data.cooc_window_days * 86_400 if data.cooc_window_days > 0 else None
    scores = cooccurrence_scores(events, window, split_events=data.cooc_user_split_events)
    pairs, counts = select_related(scores, data.cooc_upper, data.cooc_lower, data.cooc_top_t)
    return pairs, {"events": scores.num_events, "users": scores.num_users, "notes": len(scores.note_ids),
                   **counts}
