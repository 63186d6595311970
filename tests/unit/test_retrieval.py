"""Recall@k protocol: hand-built ranks, numpy brute force, the pair and pool rules, intervals, bad input."""
import numpy as np
import pytest

from notellm_jax.eval import retrieval as R
from notellm_jax.infer.ann import l2_normalise


def _at_angles(degrees, scales=None):
    """2-D vectors at the given angles, so cosine order = angular distance order, known by eye."""
    rad = np.deg2rad(np.asarray(degrees, np.float64))
    vectors = np.stack([np.cos(rad), np.sin(rad)], axis=1)
    return (vectors * (np.ones(len(rad)) if scales is None else np.asarray(scales))[:, None]).astype(np.float32)


def _numpy_ranks(queries, candidates, target_pos, query_groups=None, candidate_groups=None):
    """Brute force: full stable argsort per query in float64, restricted to the query's group if given."""
    ranks = []
    for i, q in enumerate(queries.astype(np.float64)):
        pool = np.arange(len(candidates))
        if query_groups is not None:
            pool = pool[candidate_groups == query_groups[i]]
        order = pool[np.argsort(-(candidates[pool].astype(np.float64) @ q), kind="stable")]
        ranks.append(int(np.flatnonzero(order == target_pos[i])[0]))
    return np.array(ranks)


def test_hand_example_ranks_known_by_construction():
    # q1 at 0 deg: n1 (10), n2 (20), g1 (30) -> g1 has rank 2. q2 at 90 deg: g2 (100) is nearest -> rank 0.
    # Pairs 3 and 4 reuse g1 / q1 and are dropped. Norms differ on purpose: cosine must normalise.
    ids = ["q1", "g1", "q2", "g2", "n1", "n2", "n3"]
    vectors = _at_angles([0, 30, 90, 100, 10, 20, 175], scales=[1, 2, 0.5, 3, 1, 7, 1])
    pairs = [("q1", "g1"), ("q2", "g2"), ("g1", "n1"), ("n2", "q1")]
    out = R.evaluate_recall(ids, ids, vectors, pairs, ks=[1, 2, 3, 5], bootstrap_samples=50)
    assert (out["pairs_read"], out["pairs_kept"], out["pairs_skipped_overlap"], out["pool_size"]) == (4, 2, 2, 5)
    assert {k: v["recall"] for k, v in out["recall"].items()} == {"1": 0.5, "2": 0.5, "3": 1.0, "5": 1.0}
    with pytest.raises(ValueError, match="k=6 is outside 1..5"):
        R.evaluate_recall(ids, ids, vectors, pairs, ks=[6])
    # A second relevance set (PostLinks-style) gets its own pool: only its query n3 leaves it.
    # n3 at 175 deg: g2 (100, 75 deg away) comes before its target q2 (90, 85 deg away) -> rank 1.
    links = R.evaluate_recall(ids, ids, vectors, [("n3", "q2")], ks=[1, 2], bootstrap_samples=10)
    assert links["pool_size"] == 6
    assert (links["recall"]["1"]["recall"], links["recall"]["2"]["recall"]) == (0.0, 1.0)


def test_disjoint_pairs_checks_only_kept_pairs_in_order():
    pairs = [(1, 2), (2, 3), (3, 4), (1, 5), (5, 6), (4, 7), (8, 9)]
    # (2,3) reuses 2; (3,4) is kept because 3 was only in a dropped pair; (1,5) reuses 1;
    # (5,6) is kept (5 only in a dropped pair); (4,7) reuses 4.
    assert R.disjoint_pairs(pairs) == [(1, 2), (3, 4), (5, 6), (8, 9)]
    assert R.disjoint_pairs(list(reversed(pairs))) == [(8, 9), (4, 7), (5, 6), (2, 3)]  # order matters
    with pytest.raises(ValueError, match="#1 pairs note 3 with itself"):
        R.disjoint_pairs([(1, 2), (3, 3)])


def test_pool_excludes_every_query_and_keeps_ground_truths():
    ids = ["q1", "q2", "g1", "g2", "x"]
    setup = R.build_protocol(ids, [("q1", "g1"), ("q2", "g2")])
    assert [ids[r] for r in setup.candidate_rows] == ["g1", "g2", "x"]
    assert [ids[r] for r in setup.target_rows] == ["g1", "g2"]
    # q2 sits right next to q1 and would outrank g1 (rank 1 instead of 0) if queries stayed in the pool.
    vectors = _at_angles([0, 1, 30, 200, 90])
    ranks = R.exact_target_ranks(vectors[setup.query_rows], vectors[setup.candidate_rows], setup.target_pos)
    assert ranks[0] == 0


def test_exact_paths_equal_numpy_brute_force():
    rng = np.random.default_rng(0)
    queries = l2_normalise(rng.normal(size=(37, 16)))
    candidates = l2_normalise(rng.normal(size=(301, 16)))
    target_pos = rng.integers(0, 301, size=37)
    expected = _numpy_ranks(queries, candidates, target_pos)
    # Small blocks so the padding of the last query batch and candidate chunk is exercised.
    ranks = R.exact_target_ranks(queries, candidates, target_pos, batch_size=16, chunk_size=64)
    np.testing.assert_array_equal(ranks, expected)
    neighbours, scores = R.exact_topk(queries, candidates, k=50, batch_size=16, chunk_size=64)
    reference = np.argsort(-(queries.astype(np.float64) @ candidates.T.astype(np.float64)), axis=1, kind="stable")
    np.testing.assert_array_equal(neighbours, reference[:, :50])
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ candidates.T, reference[:, :50], 1), atol=1e-6)
    from_lists = R.ranks_from_neighbours(neighbours, target_pos)
    np.testing.assert_array_equal(from_lists, np.minimum(expected, 50))
    table = R.recall_table(from_lists, [1, 10, 50], samples=10, seed=0, rank_limit=50)
    assert [table[k]["recall"] for k in ("1", "10", "50")] == [np.mean(expected < k) for k in (1, 10, 50)]
    with pytest.raises(ValueError, match="R@51 needs neighbour lists"):
        R.recall_table(from_lists, [51], samples=10, seed=0, rank_limit=50)


def test_within_group_ranks_equal_numpy():
    rng = np.random.default_rng(1)
    candidates = l2_normalise(rng.normal(size=(200, 8)))
    candidate_groups = rng.integers(0, 4, size=200)
    target_pos = rng.integers(0, 200, size=40)
    query_groups = candidate_groups[target_pos]
    queries = l2_normalise(rng.normal(size=(40, 8)))
    ranks = R.exact_target_ranks(queries, candidates, target_pos, query_groups, candidate_groups, chunk_size=48)
    np.testing.assert_array_equal(ranks, _numpy_ranks(queries, candidates, target_pos, query_groups, candidate_groups))


def test_evaluate_recall_matches_numpy_with_breakdowns():
    rng = np.random.default_rng(2)
    n = 400
    ids = [f"n{i}" for i in range(n)]
    vectors = rng.normal(size=(n, 12)).astype(np.float32)
    pairs = [(ids[a], ids[b]) for a, b in rng.integers(0, n, size=(300, 2)) if a != b]
    categories = {i: f"c{rng.integers(0, 3)}" for i in ids}
    views = {i: float(v) for i, v in zip(ids, rng.integers(0, 10_000, size=n))}
    # The embedding file holds extra notes, shuffled: alignment must pick the right rows.
    extra = [f"train{i}" for i in range(5)]
    order = rng.permutation(n + 5)
    all_ids = np.array(ids + extra, dtype=object)[order].tolist()
    all_vectors = np.concatenate([vectors, rng.normal(size=(5, 12)).astype(np.float32)])[order]
    out = R.evaluate_recall(ids, all_ids, all_vectors, pairs, ks=[1, 10], paper_k_ratios=[0.05, 0.5],
                            bootstrap_samples=200, categories=categories, views=views)
    assert out["embeddings_not_in_test_set"] == 5

    kept = R.disjoint_pairs(pairs)
    row = {i: r for r, i in enumerate(ids)}
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    query_rows = [row[q] for q, _ in kept]
    pool = [r for r in range(n) if r not in set(query_rows)]
    target_pos = np.array([pool.index(row[g]) for _, g in kept])
    ranks = _numpy_ranks(unit[query_rows], unit[pool], target_pos)
    ks = sorted({1, 10, round(0.05 * len(pool)), round(0.5 * len(pool))})
    assert out["ks"] == ks
    for k in ks:
        entry = out["recall"][str(k)]
        assert entry["recall"] == pytest.approx(np.mean(ranks < k))
        assert entry["ci_low"] <= entry["recall"] <= entry["ci_high"]

    cat = np.array([categories[i] for i in ids])
    same = np.array([cat[row[q]] == cat[row[g]] for q, g in kept])
    within = _numpy_ranks(unit[query_rows][same], unit[pool], target_pos[same],
                          cat[query_rows][same], cat[pool])
    pool_sizes = np.array([np.sum(cat[pool] == c) for c in cat[query_rows][same]])
    assert out["within_category"]["excluded_cross_category"] == int((~same).sum())
    for k in ks:
        entry = out["within_category"]["recall"][str(k)]
        judged = pool_sizes >= k  # R@200 cannot be judged in pools of ~130: reported as None, 0 queries
        assert entry["queries"] == int(judged.sum())
        assert entry["recall"] == (pytest.approx(np.mean(within[judged] < k)) if judged.any() else None)

    all_views = np.array([views[i] for i in ids])
    target_views = np.array([views[g] for _, g in kept])
    low = target_views <= np.quantile(all_views, 0.3)
    high = target_views >= np.quantile(all_views, 0.9)
    assert out["exposure"]["low"]["1"]["queries"] == int(low.sum())
    assert out["exposure"]["high"]["10"]["recall"] == pytest.approx(np.mean(ranks[high] < 10))
    # Per-query ranks for paired comparisons, in query order; the digest depends on the queries alone.
    assert out["ranks"] == ranks.tolist()
    other = R.evaluate_recall(ids, ids, rng.normal(size=(n, 12)).astype(np.float32), pairs, ks=[1, 10])
    assert other["queries_digest"] == out["queries_digest"] and other["ranks"] != out["ranks"]
    fewer = R.evaluate_recall(ids, ids, vectors, pairs[:-40], ks=[1, 10])
    assert fewer["queries_digest"] != out["queries_digest"]


def test_exposure_thresholds_by_hand():
    low, high, low_max, high_min = R.exposure_masks(np.array([0, 2, 3, 8, 9]), np.arange(10))
    # 30% quantile of 0..9 is 2.7, 90% is 8.1 (linear interpolation).
    assert (low_max, high_min) == pytest.approx((2.7, 8.1))
    assert low.tolist() == [True, True, False, False, False]
    assert high.tolist() == [False, False, False, False, True]


def test_bootstrap_interval_contains_estimate_and_shrinks():
    rng = np.random.default_rng(3)
    widths = []
    for n in (50, 5000):
        hits = rng.random(n) < 0.3
        low, high = R.bootstrap_interval(hits[:, None], samples=500, seed=0)[:, 0]
        assert low <= hits.mean() <= high
        widths.append(high - low)
    assert widths[1] < widths[0] / 5  # ~ 1/sqrt(100)
    hits = (rng.random(50) < 0.3)[:, None]
    first = R.bootstrap_interval(hits, samples=100, seed=7)
    np.testing.assert_array_equal(first, R.bootstrap_interval(hits, samples=100, seed=7))  # seeded


def test_paired_difference_against_numpy_and_where_separate_intervals_overlap():
    rng = np.random.default_rng(4)
    q = 500
    ranks_a = np.where(rng.random(q) < 0.3, 0, 200)        # A finds 30% of the ground truths first
    ranks_b = ranks_a.copy()
    lost = rng.choice(np.flatnonzero(ranks_a == 0), 15, replace=False)
    ranks_b[lost] = 50                                       # B loses 15 of them below rank 10
    out = R.paired_difference(ranks_a, ranks_b, [10, 100], samples=2000, seed=0)
    assert out["10"]["difference"] == pytest.approx(np.mean(ranks_a < 10) - np.mean(ranks_b < 10)) == 15 / q
    assert out["100"]["difference"] == 0.0 and out["10"]["queries"] == q  # rank 50 is still inside 100
    # Reference: the same resampled queries scored for both models (numpy, same seeded draws).
    draw = np.random.default_rng(0)
    diffs = [np.mean((ranks_a[i] < 10).astype(float) - (ranks_b[i] < 10)) for i in
             (draw.integers(0, q, q) for _ in range(2000))]
    assert (out["10"]["ci_low"], out["10"]["ci_high"]) == pytest.approx(tuple(np.percentile(diffs, [2.5, 97.5])))
    # Separately, the two R@10 intervals overlap; paired, B never beats A on a query, so the interval is
    # above 0.
    a_low, a_high = R.bootstrap_interval((ranks_a < 10)[:, None], 2000, 0)[:, 0]
    b_low, b_high = R.bootstrap_interval((ranks_b < 10)[:, None], 2000, 0)[:, 0]
    assert a_low < b_high
    assert out["10"]["ci_low"] > 0
    same = R.paired_difference(ranks_a, ranks_a, [1, 10], samples=200, seed=1)
    assert all((v["difference"], v["ci_low"], v["ci_high"]) == (0.0, 0.0, 0.0) for v in same.values())
    with pytest.raises(ValueError, match="same non-empty query list"):
        R.paired_difference(ranks_a, ranks_a[:-1], [10], samples=10, seed=0)
    # Which results may be paired at all: both with ranks, from the same query list.
    a, b = {"ranks": [0, 1], "queries_digest": "d"}, {"ranks": [1, 0], "queries_digest": "d"}
    assert R.pairing_problem(a, b) is None
    assert "no per-query ranks" in R.pairing_problem(a, {"queries_digest": "d"})
    assert "another query list" in R.pairing_problem(a, {**b, "queries_digest": "e"})


def test_paper_ratios_scale_with_pool():
    ks, paper = R.resolve_ks([1, 5], [100 / 258_000, 0.39, 0.9], pool_size=1000)
    assert paper == {"0.000387597": 1, "0.39": 390, "0.9": 900}
    assert ks == [1, 5, 390, 900]
    with pytest.raises(ValueError, match="k=100 is outside 1..50"):
        R.resolve_ks([100], [], pool_size=50)


def test_bad_input_errors_name_the_ids():
    ids = ["a", "b", "c"]
    vectors = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="test set is empty"):
        R.evaluate_recall([], ids, vectors, [("a", "b")], ks=[1])
    with pytest.raises(ValueError, match="1 test notes have no embedding: 'c'"):
        R.align_embeddings(ids, ["a", "b", "z"], vectors)
    with pytest.raises(ValueError, match="embedding ids contain duplicated ids: 'a'"):
        R.align_embeddings(ids, ["a", "a", "c"], vectors)
    with pytest.raises(ValueError, match="test note ids contain duplicated ids: 'b'"):
        R.build_protocol(["a", "b", "b"], [("a", "b")])
    with pytest.raises(ValueError, match="not test notes: 'zz'"):
        R.build_protocol(ids, [("a", "zz")])
    with pytest.raises(ValueError, match=r"zero or not finite \(rows 1\)"):
        l2_normalise(np.array([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="no test pairs"):
        R.build_protocol(ids, [])
