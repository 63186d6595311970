"""Issue 28's evaluation: recall per site group, paired differences pooled over seeds, the seed layout, BM25.

References are numpy re-computations: brute-force cosine ranks, masks by query site, the bootstrap drawn
again with the same generator, and BM25 written out from its formula."""
import json

import numpy as np
import pytest

from notellm_jax.config import Config, ConfigError, override
from notellm_jax.data.importers.stackexchange import site_of
from notellm_jax.eval import retrieval as R
from notellm_jax.eval.baselines import bm25_scores, bm25_tokenize
from notellm_jax.job.seeds import recall_path, seed_configs, seed_summary

GROUPS = {"seen": ("coffee",), "unseen": ("genai", "economics-2011beta")}


def test_site_of_reads_the_site_folder_from_the_note_id():
    assert site_of("coffee.stackexchange.com/485") == "coffee"
    assert site_of("economics.stackexchange.com-2011beta/7") == "economics-2011beta"
    assert site_of("sexuality.stackexchange.com-2015beta/12") == "sexuality-2015beta"
    for generic in ("cook-01", "12", "coffee.stackexchange.com/abc", "a/coffee.stackexchange.com/1"):
        assert site_of(generic) is None


def _numpy_ranks(queries, candidates, target_pos):
    scores = l2(queries) @ l2(candidates).T
    return np.array([int((np.argsort(-s, kind="stable") == t).argmax()) for s, t in zip(scores, target_pos)])


def l2(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _bootstrap(values, samples, seed):
    """retrieval.bootstrap_interval drawn again: the same generator, the same resamples."""
    rng = np.random.default_rng(seed)
    means = [values[rng.integers(0, len(values), len(values))].mean(axis=0) for _ in range(samples)]
    return np.percentile(np.asarray(means), [2.5, 97.5], axis=0)


def _se_data(n=60, seed=0):
    rng = np.random.default_rng(seed)
    sites = ["coffee.stackexchange.com", "genai.stackexchange.com", "economics.stackexchange.com-2011beta",
             "beer.stackexchange.com"]
    ids = [f"{sites[(i // 2) % 4]}/{i}" for i in range(n)]
    pairs = [(ids[i], ids[(i + 5 + i % 3) % n]) for i in range(0, n, 2)]
    return ids, rng.normal(size=(n, 6)).astype(np.float32), pairs


def test_recall_per_site_group_matches_numpy():
    ids, vectors, pairs = _se_data()
    out = R.evaluate_recall(ids, ids, vectors, pairs, ks=[1, 5, 10], bootstrap_samples=200,
                            sites={i: site_of(i) for i in ids}, site_groups=GROUPS)
    setup = R.build_protocol(ids, pairs)
    ranks = _numpy_ranks(vectors[setup.query_rows], vectors[setup.candidate_rows], setup.target_pos)
    assert out["ranks"] == ranks.tolist()
    query_sites = [site_of(ids[r]) for r in setup.query_rows]
    assert out["query_sites"] == query_sites
    target_sites = [site_of(ids[r]) for r in setup.target_rows]
    assert set(out["groups"]) == {"all", "seen", "unseen"}  # beer is in no group: only in "all"
    for name, members in [("all", None), *GROUPS.items()]:
        mask = np.array([members is None or s in members for s in query_sites])
        group = out["groups"][name]
        assert group["queries"] == mask.sum() > 0
        for k in (1, 5, 10):
            entry = group["recall"][str(k)]
            assert entry["recall"] == pytest.approx((ranks[mask] < k).mean())
            low, high = _bootstrap((ranks[mask] < k).astype(float), 200, 0)
            assert (entry["ci_low"], entry["ci_high"]) == pytest.approx((low, high))
        outside = sum(1 for q, t, m in zip(query_sites, target_sites, mask)
                      if m and (t != q if members is None else t not in members))
        assert group["targets_outside_group"] == outside
    assert out["groups"]["unseen"]["sites"] == ["economics-2011beta", "genai"]
    assert out["groups"]["all"]["targets_outside_group"] > 0  # these made-up pairs cross sites


def test_no_groups_without_sites_and_empty_groups_are_left_out():
    ids, vectors, pairs = _se_data()
    plain = [f"note-{i}" for i in range(len(ids))]
    renamed = dict(zip(ids, plain))
    out = R.evaluate_recall(plain, plain, vectors, [(renamed[a], renamed[b]) for a, b in pairs], ks=[1],
                            bootstrap_samples=10, sites={i: site_of(i) for i in plain}, site_groups=GROUPS)
    assert "groups" not in out and set(out["query_sites"]) == {None}
    only_beer = R.evaluate_recall(ids, ids, vectors, pairs, ks=[1], bootstrap_samples=10,
                                  sites={i: site_of(i) for i in ids}, site_groups={"x": ("beer",), "y": ("nowhere",)})
    assert set(only_beer["groups"]) == {"all", "x"}


def test_paired_difference_pools_seeds_by_resampling_queries():
    rng = np.random.default_rng(3)
    seeds, queries, ks = 3, 80, [1, 10]
    a = rng.integers(0, 30, size=(seeds, queries))
    b = rng.integers(0, 30, size=queries)  # a baseline no seed changes: one row for every seed
    out = R.paired_difference(a, b, ks, samples=300, seed=5)
    per_query = np.stack([(a[:, :, None] < np.array(ks)).mean(0) - (b[:, None] < np.array(ks))], 0)[0]
    low, high = _bootstrap(per_query, 300, 5)
    for i, k in enumerate(ks):
        entry = out[str(k)]
        assert entry["difference"] == pytest.approx(per_query[:, i].mean())
        assert (entry["ci_low"], entry["ci_high"]) == pytest.approx((low[i], high[i]))
        assert (entry["queries"], entry["seeds"]) == (queries, seeds)
    # Hand-built: seed 0 hits every query, seed 1 none, the baseline half -> +0.5 - 0.5 = 0 on average per query,
    # and the per-query mean over seeds (0.5 for A) leaves only the baseline's spread in the interval.
    hand_a = np.stack([np.zeros(40, int), np.full(40, 99)])
    hand_b = np.where(np.arange(40) % 2 == 0, 0, 99)
    hand = R.paired_difference(hand_a, hand_b, [1], samples=200, seed=0)["1"]
    assert hand["difference"] == 0.0 and hand["ci_low"] < 0 < hand["ci_high"]
    assert R.paired_difference(np.zeros((2, 40), int), np.full(40, 99), [1], 50, 0)["1"]["ci_low"] == 1.0
    with pytest.raises(ValueError, match="same non-empty query list"):
        R.paired_difference(np.zeros((2, 5), int), np.zeros((3, 5), int), [1], 10, 0)


def test_group_differences_subset_the_queries():
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 20, size=(2, 30)), rng.integers(0, 20, size=(2, 30))
    sites = ["genai" if i % 3 else "coffee" for i in range(30)]
    out = R.group_differences(a, b, sites, GROUPS, [5], 100, 0)
    mask = np.array([s == "genai" for s in sites])
    assert out["unseen"] == R.paired_difference(a[:, mask], b[:, mask], [5], 100, 0)
    assert out["all"] == R.paired_difference(a, b, [5], 100, 0)
    assert set(R.group_differences(a, b, None, GROUPS, [5], 10, 0)) == {"all"}


def test_seed_configs_and_pooled_summary(tmp_path):
    config = override(Config(), {"paths.work_dir": str(tmp_path), "job.seeds": 3, "train.seed": 7, "data.seed": 2,
                                 "job.train_variants": ("notellm",), "job.baselines": ("bm25", "sbert_finetuned")})
    configs = seed_configs(config)
    assert [c.train.seed for c in configs] == [7, 8, 9] and [c.data.seed for c in configs] == [2, 3, 4]
    assert len({c.work_dir for c in configs}) == 3 and len({c.data_dir for c in configs}) == 3
    assert configs[1].job.baselines == ("sbert_finetuned",) and configs[0].job.baselines == config.job.baselines
    assert seed_configs(override(config, {"job.seeds": 1})) == [override(config, {"job.seeds": 1})]
    rng = np.random.default_rng(0)
    sites = ["genai" if i % 2 else "coffee" for i in range(50)]
    ranks = {"notellm": rng.integers(0, 40, (3, 50)), "sbert_finetuned": rng.integers(0, 40, (3, 50)),
             "bm25": np.broadcast_to(rng.integers(0, 40, 50), (3, 50))}
    for model, rows in ranks.items():
        for i in range(3):
            path = recall_path(configs, i, model)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"cooccurrence": {"ranks": rows[i].tolist(), "queries_digest": "d",
                                                         "query_sites": sites}}))
    assert recall_path(configs, 2, "bm25") == recall_path(configs, 0, "bm25")  # run once
    summary = seed_summary(config, configs, ["notellm", "sbert_finetuned", "bm25"], [10])
    mask = np.array([s == "genai" for s in sites])
    unseen = summary["groups"]["unseen"]
    per_seed = (ranks["notellm"][:, mask] < 10).mean(axis=1)
    assert unseen["models"]["notellm"]["per_seed"] == [[v] for v in per_seed]
    assert unseen["models"]["notellm"]["mean"][0] == pytest.approx(per_seed.mean())
    assert unseen["models"]["notellm"]["sd"][0] == pytest.approx(per_seed.std(ddof=1))
    assert unseen["models"]["bm25"]["sd"] == pytest.approx([0.0], abs=1e-12)  # the same ranks every seed
    assert unseen["differences"]["bm25"] == R.paired_difference(ranks["notellm"][:, mask], ranks["bm25"][:, mask],
                                                                [10], 1000, 0)


def test_bm25_matches_the_formula_in_numpy():
    docs = ["the espresso grind is too fine", "grind coffee beans fine for espresso espresso",
            "a bicycle chain needs oil", "coffee coffee coffee and tea", ""]
    queries = ["fine espresso grind", "oil for the chain of a bicycle", "tea", "zebra"]
    doc_tokens, query_tokens = bm25_tokenize(docs), bm25_tokenize(queries)
    assert doc_tokens[0] == ["espresso", "grind", "too", "fine"]  # lower case, "the" and "is" (stop words) out
    k1, b = 1.2, 0.75
    got = bm25_scores(query_tokens, doc_tokens, k1, b)
    n, lengths = len(doc_tokens), np.array([len(d) for d in doc_tokens], float)
    want = np.zeros((len(queries), n))
    for qi, query in enumerate(query_tokens):
        for term in set(query):
            tf = np.array([d.count(term) for d in doc_tokens], float)
            df = (tf > 0).sum()
            if not df:
                continue
            idf = np.log(1 + (n - df + 0.5) / (df + 0.5))
            want[qi] += idf * tf / (tf + k1 * (1 - b + b * lengths / lengths.mean()))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert np.argmax(got[0]) == 0 and np.argmax(got[1]) == 2 and np.argmax(got[2]) == 3 and not got[3].any()


def test_score_matrix_ranks_count_ties_against_the_target():
    scores = np.array([[0.0, 2.0, 0.0, 1.0], [3.0, 3.0, 0.0, 0.0]])
    assert R.ranks_from_scores(scores, np.array([2, 1])).tolist() == [3, 1]  # a 0-score target is last
    groups = R.ranks_from_scores(scores, np.array([3, 1]), np.array([0, 1]), np.array([0, 1, 1, 0]))
    assert groups.tolist() == [0, 0]
    ids = ["a", "b", "c", "d"]
    out = R.evaluate_scored_recall(ids, lambda q, c: np.eye(4)[q][:, c] + 0.1, [("a", "c")], ks=[1, 3],
                                   bootstrap_samples=10)
    assert out["pool_size"] == 3 and out["ranks"] == [2]  # every candidate ties at 0.1


@pytest.mark.parametrize("updates, message", [
    ({"retrieval.site_groups": {"all": ["ai"]}}, "other than 'all'"),
    ({"retrieval.site_groups": {"x": []}}, "non-empty list"),
    ({"retrieval.headline_group": "nope"}, "headline_group"),
    ({"job.seeds": 0}, "job.seeds"),
    ({"baselines.bm25_b": 1.5}, "bm25_b"),
])
def test_bad_group_seed_and_bm25_settings_are_config_errors(updates, message):
    with pytest.raises(ConfigError, match=message):
        override(Config(), updates).validate(1)
