"""Co-occurrence scores and related-pair selection against pure-Python brute force (METHOD.md 2)."""
import itertools
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from notellm_jax.config import DataConfig
from notellm_jax.data import cooccurrence as co


def brute_force_scores(events, window=None) -> dict[tuple[str, str], Fraction]:
    """s(A->B) = sum over users with a touch of B strictly later (and at most `window` later) than a
    touch of A, of 1/N_u with N_u = distinct notes of u; exact fractions."""
    touches: dict[str, dict[str, list[int]]] = {}
    for user, note, t in events:
        touches.setdefault(user, {}).setdefault(note, []).append(t)
    scores: dict[tuple[str, str], Fraction] = {}
    for notes in touches.values():
        for a, b in itertools.permutations(notes, 2):
            if any(0 < tb - ta and (window is None or tb - ta <= window) for ta in notes[a] for tb in notes[b]):
                scores[(a, b)] = scores.get((a, b), Fraction(0)) + Fraction(1, len(notes))
    return scores


def as_dict(scores: co.CooccurrenceScores) -> dict[tuple[str, str], float]:
    m = scores.matrix.tocoo()
    ids = scores.note_ids
    return {(str(ids[a]), str(ids[b])): v for a, b, v in zip(m.row, m.col, m.data)}


def to_columns(events) -> dict[str, np.ndarray]:
    return {"user_id": np.array([e[0] for e in events], dtype=object),
            "note_id": np.array([e[1] for e in events], dtype=object),
            "timestamp": np.array([e[2] for e in events], dtype=np.int64)}


# Small id/time alphabets so that ties in time, repeated touches and one-event users are frequent.
event_logs = st.lists(st.tuples(st.sampled_from([f"u{i}" for i in range(6)]),
                                st.sampled_from([f"n{i}" for i in range(7)]),
                                st.integers(0, 8)), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(events=event_logs, window=st.sampled_from([None, 1, 3]), chunk=st.sampled_from([1, 7, 1 << 20]),
       time_scale=st.sampled_from([1, 1, 1 << 58]))
def test_scores_match_brute_force(events, window, chunk, time_scale):
    """time_scale 2^58: (user, note, time) no longer packs into 63 bits, the lexsort path sorts."""
    window = None if time_scale > 1 else window  # time-window keys would overflow int64 (a ValueError)
    events = [(u, n, t * time_scale) for u, n, t in events]
    got = as_dict(co.cooccurrence_scores(to_columns(events), window, chunk_pairs=chunk))
    expected = brute_force_scores(events, window)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        # Each 1/N_u is rounded to 2^-32 (co.WEIGHT_QUANTUM): at most 40 terms of error 2^-33.
        assert got[key] == pytest.approx(float(value), rel=0, abs=40 * co.WEIGHT_QUANTUM / 2)


def brute_force_split(events, k: int):
    """Each user's events in (time, note) order, cut into chunks of k, each chunk renamed a user."""
    by_user: dict = {}
    for user, note, t in events:
        by_user.setdefault(user, []).append((t, note))
    return [((user, i // k), note, t) for user, touches in by_user.items()
            for i, (t, note) in enumerate(sorted(touches))]


@settings(max_examples=200, deadline=None)
@given(events=event_logs, window=st.sampled_from([None, 3]), k=st.integers(1, 6))
def test_split_users_matches_brute_force(events, window, k):
    scores = co.cooccurrence_scores(to_columns(events), window, split_events=k)
    got, expected = as_dict(scores), brute_force_scores(brute_force_split(events, k), window)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(float(value), rel=0, abs=40 * co.WEIGHT_QUANTUM / 2)
    assert scores.num_users == len({e[0] for e in events}) and scores.num_events == len(events)


def test_split_changes_only_power_users():
    """u1: A(1) B(2) C(3) D(4), split 2 -> chunks {A, B} and {C, D}: A->B and C->D at 1/2, nothing across.
    u2 (2 events) is untouched: B(1) -> C(5) at 1/2."""
    events = [("u1", "A", 1), ("u1", "B", 2), ("u1", "C", 3), ("u1", "D", 4), ("u2", "B", 1), ("u2", "C", 5)]
    assert as_dict(co.cooccurrence_scores(to_columns(events), split_events=2)) == {
        ("A", "B"): 0.5, ("C", "D"): 0.5, ("B", "C"): 0.5}
    assert len(as_dict(co.cooccurrence_scores(to_columns(events)))) == 6


def test_hand_computed_example():
    """u1 touches A(t=1), B(t=2), C(t=2), A again (t=5): N=3. B and C tie, so neither orders the other;
    A's touch at t=5 comes after B and C. u2 touches only A twice (N=1): no pairs. u3: C(1), A(4) (N=2)."""
    events = [("u1", "A", 1), ("u1", "B", 2), ("u1", "C", 2), ("u1", "A", 5),
              ("u2", "A", 1), ("u2", "A", 3), ("u3", "C", 1), ("u3", "A", 4)]
    got = as_dict(co.cooccurrence_scores(pa.table(to_columns(events))))
    assert got == pytest.approx({("A", "B"): 1 / 3, ("A", "C"): 1 / 3, ("B", "A"): 1 / 3,
                                 ("C", "A"): 1 / 3 + 1 / 2})
    windowed = as_dict(co.cooccurrence_scores(to_columns(events), window_seconds=2))
    assert windowed == pytest.approx({("A", "B"): 1 / 3, ("A", "C"): 1 / 3})


def test_table_and_integer_ids_and_empty():
    events = [(1, 10, 0), (1, 20, 1), (2, 20, 0), (2, 10, 5)]
    cols = {"user_id": np.array([e[0] for e in events]), "note_id": np.array([e[1] for e in events]),
            "timestamp": np.array([e[2] for e in events])}
    scores = co.cooccurrence_scores(cols)
    assert scores.note_ids.tolist() == [10, 20] and scores.num_users == 2 and scores.num_events == 4
    assert scores.matrix.toarray().tolist() == [[0, 0.5], [0.5, 0]]
    empty = co.cooccurrence_scores({"user_id": np.array([], object), "note_id": np.array([], object),
                                    "timestamp": np.array([], np.int64)})
    assert empty.matrix.nnz == 0
    with pytest.raises(ValueError, match="missing column 'timestamp'"):
        co.cooccurrence_scores({"user_id": [1], "note_id": [2]})


def brute_force_select(scores: dict, upper: float, lower: float, top_t: int) -> list[tuple[str, str, float]]:
    kept = {k: v for k, v in scores.items() if lower <= v <= upper}
    out = []
    for a in sorted({a for a, _ in kept}):
        ranked = sorted(((b, v) for (x, b), v in kept.items() if x == a), key=lambda bv: (-bv[1], bv[0]))
        out += [(a, b, v) for b, v in (ranked[:top_t] if top_t else ranked)]
    return out


@settings(max_examples=100, deadline=None)
@given(events=event_logs, top_t=st.integers(0, 4), bounds=st.tuples(st.floats(0, 0.4), st.floats(0.3, 2.0)))
def test_select_related_matches_brute_force(events, top_t, bounds):
    scores = co.cooccurrence_scores(to_columns(events))
    lower, upper = bounds
    pairs, counts = co.select_related(scores, upper, lower, top_t)
    expected = brute_force_select(as_dict(scores), upper, lower, top_t)
    assert list(zip(*pairs.to_pydict().values())) == expected
    assert counts["candidates"] == scores.matrix.nnz
    assert counts["after_lower"] == sum(lower <= v <= upper for v in as_dict(scores).values())
    assert counts["after_top_t"] == len(expected)


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5), st.integers(0, 4)), max_size=30,
                    unique_by=lambda r: r[:2]),
       quantum=st.booleans(), shuffled=st.booleans())
def test_row_score_order_is_lexsort(rows, quantum, shuffled):
    """Packed-key ordering = np.lexsort((b, -s, a)) for co-occurrence scores (multiples of the quantum)
    and any others (dense ranks), from CSR order or any order (the Beam engine's shards)."""
    if not shuffled:
        rows = sorted(rows)
    a, b = (np.array([r[k] for r in rows], np.int64) for k in (0, 1))
    s = np.array([r[2] for r in rows], np.float64) * (co.WEIGHT_QUANTUM * 3 if quantum else 0.1)
    np.testing.assert_array_equal(co._row_score_order(a, b, s), np.lexsort((b, -s, a)))


def test_related_pairs_uses_config_window_and_filters():
    day = 86_400
    events = [("u1", "A", 0), ("u1", "B", 3 * day), ("u2", "A", 0), ("u2", "C", day // 2), ("u2", "D", day)]
    cols = to_columns(events)
    pairs, counts = co.related_pairs(cols, DataConfig(cooc_window_days=1.0, cooc_lower=0.0, cooc_top_t=10))
    # u1's B is 3 days after A: outside the 1-day window. u2 (N=3): A->C, A->D, C->D.
    assert sorted(zip(pairs["note_a"].to_pylist(), pairs["note_b"].to_pylist())) == [("A", "C"), ("A", "D"),
                                                                                      ("C", "D")]
    assert counts["users"] == 2 and counts["events"] == 5
    unbounded, _ = co.related_pairs(cols, DataConfig(cooc_window_days=0.0, cooc_lower=0.4, cooc_top_t=1))
    assert unbounded.to_pylist() == [{"note_a": "A", "note_b": "B", "score": 0.5}]
