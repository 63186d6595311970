"""Recall@k with the paper's protocol (METHOD.md 5), exact search in jnp, and bootstrap intervals.

Protocol: read the test pairs in order and keep (q, g) only if neither note appeared in an earlier
kept pair, so every query has exactly one positive; the candidate pool is every test note minus
every kept query (the ground truths stay in it); rank by cosine; R@k is the share of queries whose
ground truth is among the top k candidates.

Decisions (documented here, tested in tests/test_retrieval.py):
- Ties in score are broken by candidate position (lower first), the order `jax.lax.top_k` and a
  stable numpy argsort both use, so exact ranks and exact neighbour lists always agree.
- k larger than the candidate pool is an error (a recall there would be 1.0 by definition and
  would hide a misconfigured pool); the paper's k/N ratios give k = max(1, round(r * N)) <= N.
- Within-category recall restricts the candidates to the query's own category and uses only pairs
  whose two notes share a category (the others are counted, not hidden). A category with fewer
  candidates than k cannot be judged at that k: those queries are left out of R@k and the number
  of queries behind every R@k is reported next to it.
- Exposure buckets follow the paper's split: ground truths in the lowest 30% of test-note view
  counts ("low") and in the top 10% ("high"), thresholds taken over all test notes.
- Bootstrap intervals resample queries with replacement (seeded) and take the 2.5/97.5 percentiles.
  Two models are compared on the same queries by a paired bootstrap of the difference of their hits
  (`paired_difference`): narrower than comparing their separate intervals, which ignores that both
  face the same easy and hard queries.
- Groups (`site_groups`): a query pair belongs to the group of its query note's site; each group's R@k
  and paired differences are those of its queries, the candidate pool stays the whole pool. Data whose
  notes have no site gets no groups.
- Seeds: runs of one recipe with several seeds answer the same queries. Their paired difference averages
  each query's hit difference over the seeds, then resamples queries (a query carries all its seeds
  with it): query-seed units are not independent (a hard query is hard for every seed), so resampling
  them as if they were would understate the interval. The interval is over queries for these seeds'
  runs; the spread between seeds is reported beside it.
- A score matrix (BM25, `ranks_from_scores`) ranks every candidate tied with the target before it: a
  lexical engine returns no document that shares no term with the query, so a target scoring 0 is not
  retrieved at any k. (Dense scores practically never tie.)
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from notellm_jax.infer.ann import l2_normalise

Pair = tuple[Hashable, Hashable]
_SHOW = 5  # how many offending ids an error message names


def _some(items: Iterable[Any]) -> str:
    items = list(items)
    more = f" (and {len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return ", ".join(repr(i) for i in items[:_SHOW]) + more


def disjoint_pairs(pairs: Iterable[Pair]) -> list[Pair]:
    """Pairs kept by the paper's rule: (q, g) survives only if neither note is in an earlier kept pair.

    Reading in order and testing against *kept* pairs only (not every pair read) is what gives one
    positive per query. A pair of a note with itself is malformed input and raises.
    """
    seen: set[Hashable] = set()
    kept: list[Pair] = []
    for position, (query, target) in enumerate(pairs):
        if query == target:
            raise ValueError(f"test pair #{position} pairs note {query!r} with itself")
        if query in seen or target in seen:
            continue
        seen.update((query, target))
        kept.append((query, target))
    return kept


@dataclasses.dataclass(frozen=True)
class RecallSetup:
    """Row indices of one protocol run into the test-note embedding matrix (ordered like test_ids)."""
    query_rows: np.ndarray      # [Q] kept queries
    target_pos: np.ndarray      # [Q] position of each ground truth inside candidate_rows
    candidate_rows: np.ndarray  # [C] every test note that is not a kept query, in test_ids order
    pairs_read: int
    pairs_kept: int

    @property
    def target_rows(self) -> np.ndarray:
        return self.candidate_rows[self.target_pos]

    def digest(self) -> str:
        """Names the query list (each query's row and its ground truth's), which depends on the test notes
        and pairs alone: two models' per-query ranks can be paired only where their digests agree."""
        h = hashlib.blake2b(digest_size=12)
        for array in (self.query_rows, self.target_rows):
            h.update(np.ascontiguousarray(array, np.int64).tobytes())
        return h.hexdigest()


def _index_of(ids: Sequence[Hashable], what: str) -> dict[Hashable, int]:
    index = {note_id: row for row, note_id in enumerate(ids)}
    if len(index) != len(ids):
        counts: dict[Hashable, int] = {}
        for note_id in ids:
            counts[note_id] = counts.get(note_id, 0) + 1
        raise ValueError(f"{what} contain duplicated ids: {_some(i for i, c in counts.items() if c > 1)}")
    return index


def build_protocol(test_ids: Sequence[Hashable], pairs: Iterable[Pair]) -> RecallSetup:
    """Apply the disjoint-pair and pool rules to `pairs` over the notes `test_ids`."""
    if len(test_ids) == 0:
        raise ValueError("the test set is empty: no notes to evaluate")
    row_of = _index_of(test_ids, "test note ids")
    pairs = list(pairs)
    unknown = [i for pair in pairs for i in pair if i not in row_of]
    if unknown:
        raise ValueError(f"test pairs name notes that are not test notes: {_some(dict.fromkeys(unknown))}; "
                         "filter the pairs to the test notes first")
    kept = disjoint_pairs(pairs)
    if not kept:
        raise ValueError(f"no test pairs to evaluate ({len(pairs)} pairs read)")
    query_rows = np.array([row_of[q] for q, _ in kept], dtype=np.int64)
    is_query = np.zeros(len(test_ids), dtype=bool)
    is_query[query_rows] = True
    candidate_rows = np.flatnonzero(~is_query)
    position_in_pool = np.full(len(test_ids), -1, dtype=np.int64)
    position_in_pool[candidate_rows] = np.arange(len(candidate_rows))
    target_pos = position_in_pool[[row_of[g] for _, g in kept]]
    return RecallSetup(query_rows, target_pos, candidate_rows, len(pairs), len(kept))


def align_embeddings(test_ids: Sequence[Hashable], embedding_ids: Sequence[Hashable],
                     embeddings: np.ndarray) -> tuple[np.ndarray, int]:
    """Rows of `embeddings` in `test_ids` order, and how many embedded notes are not test notes.

    The embedding file may hold more notes than the test set (training notes too): those rows are
    not used and their number is returned. Missing or duplicated ids are errors naming the ids.
    """
    if len(test_ids) == 0:
        raise ValueError("the test set is empty: no notes to evaluate")
    if len(embedding_ids) != len(embeddings):
        raise ValueError(f"{len(embedding_ids)} embedding ids for {len(embeddings)} embedding rows")
    row_of = _index_of(embedding_ids, "embedding ids")
    _index_of(test_ids, "test note ids")
    missing = [i for i in test_ids if i not in row_of]
    if missing:
        raise ValueError(f"{len(missing)} test notes have no embedding: {_some(missing)}")
    rows = np.array([row_of[i] for i in test_ids], dtype=np.int64)
    return np.asarray(embeddings)[rows], len(embedding_ids) - len(test_ids)


def _pad_to(x: np.ndarray, length: int) -> np.ndarray:
    """Zero-pad axis 0 to `length`, so every jitted block has one static shape (one compile)."""
    return np.pad(x, [(0, length - len(x))] + [(0, 0)] * (x.ndim - 1))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _scores(queries: jax.Array, candidates: jax.Array) -> jax.Array:
    return jnp.einsum("qd,cd->qc", queries, candidates, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames=("k",))
def _merge_topk(best_scores, best_idx, queries, chunk, offset, num_valid, k: int):
    """Fold one candidate chunk into the running top k (earlier = lower index first, so ties stay stable)."""
    columns = offset + jnp.arange(chunk.shape[0])
    scores = jnp.where(columns < num_valid, _scores(queries, chunk), -jnp.inf)
    all_scores = jnp.concatenate([best_scores, scores], axis=1)
    all_idx = jnp.concatenate([best_idx, jnp.broadcast_to(columns, scores.shape)], axis=1)
    top_scores, where = jax.lax.top_k(all_scores, k)
    return top_scores, jnp.take_along_axis(all_idx, where, axis=1)


def _check_k(k: int, pool: int) -> None:
    if not 1 <= k <= pool:
        raise ValueError(f"k={k} is outside 1..{pool}, the size of the candidate pool")


def exact_topk(queries: np.ndarray, candidates: np.ndarray, k: int, batch_size: int = 1024,
               chunk_size: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k candidates by dot product for every query: (indices [Q, k], scores [Q, k]).

    Works on [batch_size, chunk_size] score blocks merged with `jax.lax.top_k`, so memory is bounded
    by the block and k, not by Q x C (a million notes fit). Inputs are used as given: normalise first
    for cosine.
    """
    _check_k(k, len(candidates))
    if len(queries) == 0:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    chunk_size = min(chunk_size, len(candidates))
    padded = jnp.asarray(_pad_to(np.asarray(candidates, np.float32), _round_up(len(candidates), chunk_size)))
    out_idx, out_scores = [], []
    for start in range(0, len(queries), batch_size):
        batch = np.asarray(queries[start:start + batch_size], np.float32)
        q = jnp.asarray(_pad_to(batch, batch_size))
        best_scores = jnp.full((batch_size, k), -jnp.inf, jnp.float32)
        best_idx = jnp.full((batch_size, k), -1, jnp.int32)
        for offset in range(0, padded.shape[0], chunk_size):
            best_scores, best_idx = _merge_topk(best_scores, best_idx, q, padded[offset:offset + chunk_size],
                                                offset, len(candidates), k=k)
        out_idx.append(np.asarray(best_idx)[:len(batch)].astype(np.int64))
        out_scores.append(np.asarray(best_scores)[:len(batch)])
    return np.concatenate(out_idx), np.concatenate(out_scores)


@jax.jit
def _count_above(queries, target_scores, target_pos, query_groups, chunk, chunk_groups, offset, num_valid):
    """Per query: candidates in this chunk (same group, valid) ranked before its target."""
    columns = offset + jnp.arange(chunk.shape[0])
    scores = _scores(queries, chunk)
    target = target_pos[:, None]
    before = (scores > target_scores[:, None]) | ((scores == target_scores[:, None]) & (columns[None, :] < target))
    counted = (before & (columns[None, :] != target) & (columns < num_valid)[None, :]
               & (chunk_groups[None, :] == query_groups[:, None]))
    return counted.sum(axis=1)


def exact_target_ranks(queries: np.ndarray, candidates: np.ndarray, target_pos: np.ndarray,
                       query_groups: np.ndarray | None = None, candidate_groups: np.ndarray | None = None,
                       batch_size: int = 1024, chunk_size: int = 16384) -> np.ndarray:
    """0-based rank of each query's target among the candidates (same-group candidates only if groups given).

    Counting candidates that score above the target gives the rank for every k at once, which
    neighbour lists cannot do at the paper's large k (39% of the pool). Same tie rule as exact_topk;
    the target's own score comes from a row-wise dot, so a rival within float rounding of it may
    land on either side.
    """
    num = len(candidates)
    if len(queries) == 0:
        return np.zeros(0, np.int64)
    if query_groups is None or candidate_groups is None:
        query_groups, candidate_groups = np.zeros(len(queries), np.int32), np.zeros(num, np.int32)
    chunk_size = min(chunk_size, num)
    cands = np.asarray(candidates, np.float32)
    padded = jnp.asarray(_pad_to(cands, _round_up(num, chunk_size)))
    groups = jnp.asarray(_pad_to(np.asarray(candidate_groups, np.int32), padded.shape[0]))
    ranks = []
    for start in range(0, len(queries), batch_size):
        stop = min(start + batch_size, len(queries))
        q = np.asarray(queries[start:stop], np.float32)
        target_scores = np.asarray(jnp.einsum("qd,qd->q", q, cands[target_pos[start:stop]],
                                              precision=jax.lax.Precision.HIGHEST))
        block = (q, target_scores, np.asarray(target_pos[start:stop], np.int32),
                 np.asarray(query_groups[start:stop], np.int32))
        args = [jnp.asarray(_pad_to(a, batch_size)) for a in block]
        count = jnp.zeros(batch_size, jnp.int32)
        for offset in range(0, padded.shape[0], chunk_size):
            count = count + _count_above(*args, padded[offset:offset + chunk_size],
                                         groups[offset:offset + chunk_size], offset, num)
        ranks.append(np.asarray(count)[:stop - start])
    return np.concatenate(ranks).astype(np.int64)


def ranks_from_neighbours(neighbours: np.ndarray, target_pos: np.ndarray) -> np.ndarray:
    """Rank of each target inside its neighbour list (exact or ANN); list length when it is absent."""
    neighbours = np.asarray(neighbours)
    found = neighbours == np.asarray(target_pos)[:, None]
    return np.where(found.any(axis=1), found.argmax(axis=1), neighbours.shape[1])


def ranks_from_scores(scores: np.ndarray, target_pos: np.ndarray, query_groups: np.ndarray | None = None,
                      candidate_groups: np.ndarray | None = None) -> np.ndarray:
    """0-based rank of each query's target from a [Q, C] score matrix: candidates scoring at least as high as
    the target (ties count against it, see the module docstring), same-group candidates only if groups given."""
    scores = np.asarray(scores)
    rows = np.arange(len(scores))
    ahead = scores >= scores[rows, target_pos][:, None]
    ahead[rows, target_pos] = False
    if query_groups is not None and candidate_groups is not None:
        ahead &= np.asarray(candidate_groups)[None, :] == np.asarray(query_groups)[:, None]
    return ahead.sum(axis=1).astype(np.int64)


def resolve_ks(ks: Sequence[int], ratios: Sequence[float], pool_size: int) -> tuple[list[int], dict[str, int]]:
    """Small ks plus k = max(1, round(r * pool)) for each paper ratio r; every k must fit the pool."""
    paper = {f"{r:.6g}": max(1, round(r * pool_size)) for r in ratios}
    all_ks = sorted(set(ks) | set(paper.values()))
    for k in all_ks:
        _check_k(k, pool_size)
    return all_ks, paper


def bootstrap_interval(hits: np.ndarray, samples: int, seed: int, level: float = 0.95) -> np.ndarray:
    """Percentile interval of the mean of each column of `hits` [Q, K], resampling queries (rows)."""
    hits = np.asarray(hits, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.stack([hits[rng.integers(0, len(hits), len(hits))].mean(axis=0) for _ in range(samples)])
    tail = (1 - level) / 2 * 100
    return np.percentile(means, [tail, 100 - tail], axis=0)


def pairing_problem(a: Mapping[str, Any], b: Mapping[str, Any]) -> str | None:
    """Why two `evaluate_recall` results cannot be compared query by query, or None when they can."""
    if a.get("ranks") is None or b.get("ranks") is None:
        return "no per-query ranks (a result written before they were kept: rerun its recall)"
    if a.get("queries_digest") != b.get("queries_digest"):
        return (f"another query list (digest {a.get('queries_digest')} against {b.get('queries_digest')}): "
                "the runs' test notes or pairs differ")
    return None


def seed_hits(ranks: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """[Q, K] share of seeds in which each query's target is in the top k: ranks [Q] (one run) or [S, Q]
    (S seeds on the same queries)."""
    ranks = np.asarray(ranks)
    ranks = ranks[None] if ranks.ndim == 1 else ranks
    return (ranks[:, :, None] < np.asarray(list(ks))).mean(axis=0)


def paired_difference(ranks_a: np.ndarray, ranks_b: np.ndarray, ks: Sequence[int], samples: int, seed: int,
                      level: float = 0.95) -> dict[str, dict]:
    """R@k of model A minus R@k of model B on the same queries, with a paired bootstrap interval: each
    resample draws the queries once and scores both models on them, so what the two share (easy and hard
    queries) cancels. Ranks are [Q] (one run) or [S, Q] (S seeds; a model no seed changes may give [Q]):
    each query's difference is averaged over the seeds before queries are resampled (module docstring).
    {str(k): {difference, ci_low, ci_high, queries, seeds}}."""
    a, b = np.asarray(ranks_a), np.asarray(ranks_b)
    a, b = (a[None] if a.ndim == 1 else a), (b[None] if b.ndim == 1 else b)
    same_queries = a.ndim == b.ndim == 2 and a.shape[1] == b.shape[1] > 0
    if not same_queries or (len(a) != len(b) and 1 not in (len(a), len(b))):
        raise ValueError(f"paired recall needs the same non-empty query list for both models (and as many "
                         f"seeds, or one run for either): ranks of shape {np.shape(ranks_a)} and {np.shape(ranks_b)}")
    ks = list(ks)
    seeds = max(len(a), len(b))
    a, b = np.broadcast_to(a, (seeds, a.shape[1])), np.broadcast_to(b, (seeds, b.shape[1]))
    diff = seed_hits(a, ks) - seed_hits(b, ks)
    low, high = bootstrap_interval(diff, samples, seed, level)
    return {str(k): {"difference": float(diff[:, i].mean()), "ci_low": float(low[i]), "ci_high": float(high[i]),
                     "queries": a.shape[1], "seeds": seeds} for i, k in enumerate(ks)}


def group_masks(query_sites: Sequence[str | None], site_groups: Mapping[str, Sequence[str]]) -> dict[str, np.ndarray]:
    """{"all": every query, group: its queries} for the groups that hold a query; {} when no query has a site."""
    sites = np.asarray([s if s is not None else "" for s in query_sites], dtype=object)
    if not len(sites) or not any(sites):
        return {}
    masks = {"all": np.ones(len(sites), bool)}
    for name, members in site_groups.items():
        mask = np.isin(sites, list(members))
        if mask.any():
            masks[name] = mask
    return masks


def group_differences(ranks_a: np.ndarray, ranks_b: np.ndarray, query_sites: Sequence[str | None] | None,
                      site_groups: Mapping[str, Sequence[str]], ks: Sequence[int], samples: int,
                      seed: int) -> dict[str, dict[str, dict]]:
    """`paired_difference` for all queries and each site group ({"all": ...} alone without sites)."""
    a, b = np.asarray(ranks_a), np.asarray(ranks_b)
    masks = group_masks(query_sites or [], site_groups) or {"all": np.ones(a.shape[-1], bool)}
    return {name: paired_difference(a[..., mask], b[..., mask], ks, samples, seed) for name, mask in masks.items()}


def format_difference(entry: Mapping[str, float]) -> str:
    """`+2.8 [-1.2, +6.9]`: one `paired_difference` entry in recall points, as the report and the CLI print it."""
    return f"{100 * entry['difference']:+.1f} [{100 * entry['ci_low']:+.1f}, {100 * entry['ci_high']:+.1f}]"


def recall_table(ranks: np.ndarray, ks: Sequence[int], samples: int, seed: int,
                 pool_sizes: np.ndarray | None = None, rank_limit: int | None = None) -> dict[str, dict]:
    """R@k with a bootstrap interval for each k: {str(k): {recall, ci_low, ci_high, queries}}.

    pool_sizes: per-query pool size; queries whose pool is smaller than k are not counted at that k.
    rank_limit: ranks come from neighbour lists of this length, so only k <= rank_limit is known.
    """
    ranks = np.asarray(ranks)
    table = {}
    for k in ks:
        if rank_limit is not None and k > rank_limit:
            raise ValueError(f"R@{k} needs neighbour lists of length >= {k}, got {rank_limit}")
        judged = np.ones(len(ranks), bool) if pool_sizes is None else np.asarray(pool_sizes) >= k
        hits = (ranks[judged] < k)[:, None]
        entry: dict[str, Any] = {"recall": None, "ci_low": None, "ci_high": None, "queries": int(judged.sum())}
        if hits.size:
            low, high = bootstrap_interval(hits, samples, seed)[:, 0]
            entry.update(recall=float(hits.mean()), ci_low=float(low), ci_high=float(high))
        table[str(k)] = entry
    return table


def exposure_masks(target_views: np.ndarray, all_views: np.ndarray, low_quantile: float = 0.3,
                   high_quantile: float = 0.9) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(low, high, low_max, high_min): ground truths at or below the 30% view-count quantile of the
    test notes, and at or above the 90% quantile (the paper's 30% low / top 10% high exposure)."""
    low_max, high_min = np.quantile(np.asarray(all_views, np.float64), [low_quantile, high_quantile])
    target_views = np.asarray(target_views, np.float64)
    return target_views <= low_max, target_views >= high_min, float(low_max), float(high_min)


def _codes(labels: Sequence[Hashable]) -> np.ndarray:
    _, codes = np.unique(np.asarray([str(label) for label in labels]), return_inverse=True)
    return codes.astype(np.int32)


RankTargets = Callable[..., np.ndarray]  # (query selection, query groups, candidate groups) -> target ranks


def _dense_ranker(queries: np.ndarray, candidates: np.ndarray, target_pos: np.ndarray) -> RankTargets:
    def rank(select, query_groups=None, candidate_groups=None):
        return exact_target_ranks(queries[select], candidates, target_pos[select], query_groups, candidate_groups)
    return rank


def _score_ranker(scores: np.ndarray, target_pos: np.ndarray) -> RankTargets:
    def rank(select, query_groups=None, candidate_groups=None):
        return ranks_from_scores(scores[select], target_pos[select], query_groups, candidate_groups)
    return rank


def evaluate_recall(test_ids: Sequence[Hashable], embedding_ids: Sequence[Hashable], embeddings: np.ndarray,
                    pairs: Iterable[Pair], ks: Sequence[int], **options) -> dict[str, Any]:
    """The whole exact-search protocol for one relevance set (co-occurrence pairs, PostLinks, ...) over
    embeddings (cosine ranking); `options` are `evaluate_ranking`'s."""
    setup = build_protocol(test_ids, pairs)
    vectors, unused = align_embeddings(test_ids, embedding_ids, embeddings)
    vectors = l2_normalise(vectors)
    rank = _dense_ranker(vectors[setup.query_rows], vectors[setup.candidate_rows], setup.target_pos)
    return {**evaluate_ranking(setup, rank, test_ids, ks, **options), "embeddings_not_in_test_set": unused}


def evaluate_scored_recall(test_ids: Sequence[Hashable], score: Callable[[np.ndarray, np.ndarray], np.ndarray],
                           pairs: Iterable[Pair], ks: Sequence[int], **options) -> dict[str, Any]:
    """The same protocol for a scorer without embeddings (BM25): `score(query_rows, candidate_rows)` gives the
    [Q, C] scores of the kept queries against the pool (rows of `test_ids`); `options` are `evaluate_ranking`'s."""
    setup = build_protocol(test_ids, pairs)
    scores = np.asarray(score(setup.query_rows, setup.candidate_rows), np.float64)
    if scores.shape != (len(setup.query_rows), len(setup.candidate_rows)):
        raise ValueError(f"the scorer returned shape {scores.shape}, not queries x candidates "
                         f"{(len(setup.query_rows), len(setup.candidate_rows))}")
    return evaluate_ranking(setup, _score_ranker(scores, setup.target_pos), test_ids, ks, **options)


def evaluate_ranking(setup: RecallSetup, rank: RankTargets, test_ids: Sequence[Hashable], ks: Sequence[int],
                     paper_k_ratios: Sequence[float] = (), bootstrap_samples: int = 1000, seed: int = 0,
                     categories: Mapping[Hashable, Hashable] | None = None,
                     views: Mapping[Hashable, float] | None = None, clip_ks: bool = False,
                     sites: Mapping[Hashable, str | None] | None = None,
                     site_groups: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """Counts, the ks used, the overall recall table and, when categories / views / sites are given, the
    within-category, exposure-bucket and site-group tables, as a JSON-ready dict. A k larger than the
    candidate pool is an error, unless `clip_ks` (default ks that should scale with the pool): then it is left
    out and listed under "ks_dropped"."""
    pool = len(setup.candidate_rows)
    dropped = sorted(k for k in ks if k > pool) if clip_ks else []
    all_ks, paper_ks = resolve_ks([k for k in ks if k not in dropped], paper_k_ratios, pool)
    ranks = rank(np.arange(len(setup.query_rows)))
    result: dict[str, Any] = {
        "test_notes": len(test_ids), "pairs_read": setup.pairs_read,
        "pairs_kept": setup.pairs_kept, "pairs_skipped_overlap": setup.pairs_read - setup.pairs_kept,
        "pool_size": pool, "ks": all_ks, "paper_ks": paper_ks, "ks_dropped": dropped,
        "recall": recall_table(ranks, all_ks, bootstrap_samples, seed),
        # Per-query ranks of the ground truth (0 = first), in query order: what paired comparisons between
        # models read (`paired_difference`); `queries_digest` names that order.
        "ranks": [int(r) for r in ranks], "queries_digest": setup.digest(),
    }
    if categories is not None:
        result["within_category"] = _within_category(setup, test_ids, categories, rank, all_ks,
                                                     bootstrap_samples, seed)
    if views is not None:
        result["exposure"] = _exposure(setup, test_ids, views, ranks, all_ks, bootstrap_samples, seed)
    if sites is not None:
        result.update(site_group_recall(setup, test_ids, sites, site_groups or {}, ranks, all_ks,
                                        bootstrap_samples, seed))
    return result


def site_group_recall(setup: RecallSetup, test_ids: Sequence[Hashable], sites: Mapping[Hashable, str | None],
                      site_groups: Mapping[str, Sequence[str]], ranks: np.ndarray, ks: Sequence[int], samples: int,
                      seed: int) -> dict[str, Any]:
    """{"query_sites": each query's site, in query order, "groups": {group: its queries' R@k table, the sites
    found, how many of its queries have their ground truth on a site outside the group ("all": on another site
    than the query's)}} ("all" included; no "groups" when no query has a site)."""
    query_sites = [sites.get(test_ids[row]) for row in setup.query_rows]
    target_sites = [sites.get(test_ids[row]) for row in setup.target_rows]
    groups = {}
    for name, mask in group_masks(query_sites, site_groups).items():
        members = set(site_groups.get(name, ()))
        outside = [(t != q) if name == "all" else (t not in members)
                   for q, t, m in zip(query_sites, target_sites, mask) if m]
        groups[name] = {"queries": int(mask.sum()),
                        "sites": sorted({s for s, m in zip(query_sites, mask) if m and s is not None}),
                        "sites_without_queries": sorted(members - set(query_sites)),
                        "targets_outside_group": int(sum(outside)),
                        "recall": recall_table(ranks[mask], ks, samples, seed)}
    return {"query_sites": query_sites, **({"groups": groups} if groups else {})}


def _lookup(mapping: Mapping[Hashable, Any], ids: Sequence[Hashable], what: str) -> list[Any]:
    missing = [i for i in ids if i not in mapping]
    if missing:
        raise ValueError(f"{len(missing)} test notes have no {what}: {_some(missing)}")
    return [mapping[i] for i in ids]


def _within_category(setup: RecallSetup, test_ids, categories, rank: RankTargets, ks, samples, seed) -> dict:
    codes = _codes(_lookup(categories, test_ids, "category"))
    query_codes, pool_codes = codes[setup.query_rows], codes[setup.candidate_rows]
    same = query_codes == pool_codes[setup.target_pos]
    ranks = rank(same, query_codes[same], pool_codes)
    pool_sizes = np.bincount(pool_codes, minlength=codes.max() + 1)[query_codes[same]]
    return {"queries": int(same.sum()), "excluded_cross_category": int((~same).sum()),
            "recall": recall_table(ranks, ks, samples, seed, pool_sizes=pool_sizes)}


def _exposure(setup: RecallSetup, test_ids, views, ranks, ks, samples, seed) -> dict:
    all_views = np.asarray(_lookup(views, test_ids, "view count"), np.float64)
    low, high, low_max, high_min = exposure_masks(all_views[setup.target_rows], all_views)
    return {"low_max_views": low_max, "high_min_views": high_min,
            "low": recall_table(ranks[low], ks, samples, seed),
            "high": recall_table(ranks[high], ks, samples, seed)}
