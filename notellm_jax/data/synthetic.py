"""A seeded synthetic behaviour log with a platform's skew, written as the importers write a store.

    notellm synthetic --out DIR [--events 1000000] [--seed 0]

writes DIR/notes.parquet, events.parquet and empty pairs_postlinks.parquet / pairs_given.parquet
(the four files of prepare's import stage), so `prepare --stages cooccurrence,splits,...` runs on it.
The generative model (parameters in `SyntheticLog`):
- User activity is power-law: user i makes min(max_user_events, floor(x)) events with x Pareto
  (shape `user_alpha`, minimum 1), so most users act once and a few act hundreds of times.
- Note popularity is power-law (Zipf): each event picks note n (popularity rank n, in a seeded random
  id order) with probability proportional to (n + 1) ** -note_exponent.
- Events come in time-ordered sessions: a user's events are cut into sessions of geometric length
  (mean `session_events`), each starting at a uniform time in [0, days) with exponential gaps (mean
  `gap_seconds`) between its events. Timestamps are int seconds; the log is written sorted by time.
- A note is created shortly before its first touch (exponential lead, mean `creation_lead_days`);
  untouched notes get a uniform creation time. Categories are Zipf-distributed over `categories`
  names, topics are 1..3 of the category's `topics_per_category` tags, exposure = touches * 10.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from notellm_jax.data import store

DAY = 86_400
_WORDS = ("river", "garden", "recipe", "travel", "camera", "music", "winter", "coffee", "design", "runner",
          "python", "forest", "market", "studio", "planet", "harbor")


@dataclasses.dataclass(frozen=True)
class SyntheticLog:
    num_events: int = 1_000_000
    # Notes in the catalogue (0 = num_events // 20); not all get touched.
    num_notes: int = 0
    user_alpha: float = 2.0          # Pareto shape of events per user (smaller = heavier tail)
    max_user_events: int = 500       # cap on one user's events (a bot filter would stop the rest)
    note_exponent: float = 0.9       # Zipf exponent of note popularity
    session_events: float = 5.0      # mean events per session
    gap_seconds: float = 120.0       # mean gap between events of one session
    days: float = 30.0               # length of the log
    creation_lead_days: float = 1.0  # mean time between a note's creation and its first touch
    start: int = 1_767_225_600       # unix time of the log's start (2026-01-01 UTC)
    categories: int = 12
    topics_per_category: int = 8
    seed: int = 0


def _user_counts(log: SyntheticLog, rng: np.random.Generator) -> np.ndarray:
    """Events per user, Pareto-tailed, summing to exactly num_events."""
    counts: list[np.ndarray] = []
    total = 0
    while total < log.num_events:
        draw = np.floor(rng.pareto(log.user_alpha, size=max(log.num_events // 4, 16)) + 1).astype(np.int64)
        draw = np.minimum(draw, log.max_user_events)
        counts.append(draw)
        total += int(draw.sum())
    per_user = np.concatenate(counts)
    end = int(np.searchsorted(np.cumsum(per_user), log.num_events)) + 1
    per_user = per_user[:end]
    per_user[-1] -= int(per_user.sum()) - log.num_events
    return per_user


def _timestamps(per_user: np.ndarray, log: SyntheticLog, rng: np.random.Generator) -> np.ndarray:
    """Per event (grouped by user): session start + cumulative gaps; a new session with p = 1/mean."""
    n = int(per_user.sum())
    first_of_user = np.zeros(n, bool)
    first_of_user[np.cumsum(per_user) - per_user] = True
    new_session = first_of_user | (rng.random(n) < 1.0 / log.session_events)
    session = np.cumsum(new_session) - 1
    starts = rng.uniform(0, log.days * DAY, size=int(session[-1]) + 1)
    gaps = np.where(new_session, 0.0, rng.exponential(log.gap_seconds, size=n))
    cum = np.cumsum(gaps)
    offset = cum - cum[np.flatnonzero(new_session)][session]
    return log.start + (starts[session] + offset).astype(np.int64)


def _ids(prefix: str, numbers: np.ndarray) -> pa.Array:
    """prefix + decimal number, built in Arrow (numpy string conversion is ~10x slower)."""
    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(numbers), pa.string()), "")


def generate(log: SyntheticLog) -> tuple[pa.Table, pa.Table]:
    """(notes, events) tables with NOTES_SCHEMA / EVENTS_SCHEMA, fully determined by `log`."""
    rng = np.random.default_rng(log.seed)
    num_notes = log.num_notes or max(log.num_events // 20, 10)
    per_user = _user_counts(log, rng)
    user = np.repeat(np.arange(len(per_user)), per_user)
    time = _timestamps(per_user, log, rng)
    weights = np.cumsum(1.0 / np.arange(1, num_notes + 1) ** log.note_exponent)
    rank = np.searchsorted(weights, rng.random(len(user)) * weights[-1], side="right")
    note = rng.permutation(num_notes)[np.minimum(rank, num_notes - 1)]
    order = np.argsort(time, kind="stable")
    user, note, time = user[order], note[order], time[order]

    first_touch = np.full(num_notes, -1, np.int64)
    touched, first = np.unique(note, return_index=True)  # events are time-sorted: first index = first touch
    first_touch[touched] = time[first]
    lead = rng.exponential(log.creation_lead_days * DAY, size=num_notes).astype(np.int64)
    created = np.where(first_touch >= 0, first_touch - lead, log.start + rng.integers(0, int(log.days * DAY), num_notes))
    cat_weights = 1.0 / np.arange(1, log.categories + 1)
    category = rng.choice(log.categories, size=num_notes, p=cat_weights / cat_weights.sum())
    n_topics = rng.integers(1, 4, size=num_notes)
    topic_pick = np.argsort(rng.random((num_notes, log.topics_per_category)), axis=1)[:, :3]  # distinct
    touches = np.bincount(note, minlength=num_notes)
    note_ids = _ids("n", np.arange(num_notes))
    notes = store.to_table({
        "note_id": note_ids,
        "title": [f"{_WORDS[i % len(_WORDS)]} {_WORDS[(i // 7) % len(_WORDS)]} {i}" for i in range(num_notes)],
        "content": [f"A note about {_WORDS[(i // 3) % len(_WORDS)]} in category {c}." for i, c in enumerate(category)],
        "topics": [[f"c{c}t{t}" for t in topic_pick[i, :k]] for i, (c, k) in enumerate(zip(category, n_topics))],
        "category": _ids("cat", category),
        "created_at": created, "exposure": touches * 10}, store.NOTES_SCHEMA, "synthetic notes")
    events = store.to_table({"user_id": _ids("u", user), "note_id": note_ids.take(pa.array(note)),
                             "timestamp": time, "action": pa.repeat("click", len(user))},
                            store.EVENTS_SCHEMA, "synthetic events")
    return notes, events


def write_store(log: SyntheticLog, data_dir: str | Path) -> dict[str, int]:
    """Write the import stage's four files for `log` into data_dir; returns counts."""
    data_dir = Path(data_dir)
    notes, events = generate(log)
    store.write_events(events, data_dir / "events.parquet")
    store.write_links({"note_a": [], "note_b": [], "link_type": []}, data_dir / "pairs_postlinks.parquet")
    store.write_pairs({"note_a": [], "note_b": [], "score": []}, data_dir / "pairs_given.parquet")
    store.write_notes(notes, data_dir / "notes.parquet")  # last: its presence marks a complete import
    return {"notes": len(notes), "events": len(events), "users": len(pc.unique(events["user_id"]))}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="data folder to write (e.g. <work_dir>/data)")
    parser.add_argument("--events", type=int, default=SyntheticLog.num_events)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace, config=None) -> dict[str, int]:
    """`notellm synthetic`: write the log's store into --out and print its counts."""
    counts = write_store(SyntheticLog(num_events=args.events, seed=args.seed), args.out)
    print(counts)
    return counts
