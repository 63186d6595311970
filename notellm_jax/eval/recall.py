"""Recall evaluation of one embeddings folder (or of BM25): `notellm recall --config ... --embeddings DIR|--bm25`.

Inputs, from config.data_dir (default <work_dir>/data): the test notes (split.json; categories and view
counts from notes.parquet), the test pairs (pairs_test.parquet, co-occurrence from the test period) and
the explicit PostLinks pairs (pairs_postlinks.parquet, kept only where both notes are test notes; how
many survive is reported).
Exact search follows the paper's protocol (`notellm_jax.eval.retrieval.evaluate_recall`: disjoint pairs,
queries removed from the pool, small k and the paper's k/N ratios, bootstrap intervals, within-category
and exposure buckets). ScaNN (`notellm_jax.infer.ann`) then indexes the same candidate pool with the
config's parameters, is saved and reloaded, and the reloaded index answers the same queries: its
Recall@k for the small ks, its overlap with the exact top k, and the time and QPS of both searches.
`--against RECALL_JSON` (repeatable) adds this model minus another recall result on the same queries, with
paired bootstrap intervals (`retrieval.paired_difference`): the way to compare runs of different jobs.
Site groups (`retrieval.site_groups`): every table above is also given for the queries of each group of
Stack Exchange sites (a pair's group is its query note's site, `stackexchange.site_of` on the note id);
data whose note ids name no site has no groups. `--bm25` scores the lexical baseline instead of an
embeddings folder (`evaluate_lexical`): the same protocol and tables, without ScaNN.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from notellm_jax.config import Config
from notellm_jax.data import store
from notellm_jax.data.importers.stackexchange import site_of
from notellm_jax.errors import InputFormatError, MissingInputError
from notellm_jax.eval.retrieval import (build_protocol, evaluate_recall, evaluate_scored_recall, exact_topk,
                                        format_difference, group_differences, pairing_problem, ranks_from_neighbours,
                                        recall_table, site_group_recall)
from notellm_jax.infer import ann
from notellm_jax.infer.ann import l2_normalise, neighbour_overlap
from notellm_jax.infer.embeddings import read_embeddings, read_embeddings_meta

Pair = tuple[str, str]
DEFAULT_KS = (1, 5, 10, 20, 50, 100)  # retrieval.ks=None: these, clipped to the candidate pool


def _pairs(path: Path) -> list[Pair]:
    table = store.read_columns(path, ("note_a", "note_b")).to_pydict()
    return [(str(a), str(b)) for a, b in zip(table["note_a"], table["note_b"])]


def load_test_data(data_dir: Path) -> dict[str, Any]:
    """Test note ids, their categories and view counts, the test pairs and the PostLinks pairs among test notes."""
    test_ids = store.split_note_ids(data_dir, "test")
    notes = store.read_columns(data_dir / "notes.parquet", ("note_id", "category", "exposure")).to_pydict()
    test_set = set(test_ids)
    info = {str(i): (c, v) for i, c, v in zip(notes["note_id"], notes["category"], notes["exposure"])
            if str(i) in test_set}
    links_path = data_dir / "pairs_postlinks.parquet"
    links = _pairs(links_path) if links_path.is_file() else []
    return {"test_ids": test_ids,
            "categories": {i: c for i, (c, _) in info.items()},
            "sites": {i: site_of(i) for i in test_ids},
            "views": {i: v for i, (_, v) in info.items()},
            "pairs": _pairs(data_dir / "pairs_test.parquet"),
            "postlinks_in_file": len(links),
            "postlinks": [(a, b) for a, b in links if a in test_set and b in test_set and a != b]}


def scann_recall(vectors: np.ndarray, test_ids: Sequence[str], pairs: Sequence[Pair], ks: Sequence[int],
                 config: Config, index_dir: Path) -> dict[str, Any]:
    """Build a ScaNN index over the protocol's candidate pool, save, reload, search; recall vs exact."""
    setup = build_protocol(test_ids, pairs)
    vectors = l2_normalise(vectors)
    queries, candidates = vectors[setup.query_rows], vectors[setup.candidate_rows]
    ks = sorted(k for k in ks if k <= len(candidates))
    if not ks:
        raise ValueError(f"every retrieval.ks value exceeds the candidate pool of {len(candidates)} notes")
    k = ks[-1]
    params = ann.choose_params(len(candidates), k, config.retrieval)
    timings: dict[str, float] = {}
    ann.scann_pybind()  # imported here so that its import time is not counted as build time

    start = time.perf_counter()
    searcher = ann.build_index(candidates, k, params)
    timings["build_s"] = time.perf_counter() - start
    ann.save_index(searcher, index_dir)
    start = time.perf_counter()
    searcher = ann.load_index(index_dir)
    timings["load_s"] = time.perf_counter() - start
    start = time.perf_counter()
    approx, _ = ann.search(searcher, queries, k)
    timings["search_s"] = time.perf_counter() - start
    exact_topk(queries[:1], candidates, k)  # compile outside the timing (the query block shape is fixed)
    start = time.perf_counter()
    exact, _ = exact_topk(queries, candidates, k)
    timings["exact_search_s"] = time.perf_counter() - start
    ranks = ranks_from_neighbours(approx, setup.target_pos)
    samples, seed = config.retrieval.bootstrap_samples, config.retrieval.bootstrap_seed
    return {"params": {"num_leaves": params.num_leaves, "leaves_to_search": params.leaves_to_search,
                       "reorder": params.reorder, "brute_force": params.brute_force},
            "index_dir": str(index_dir), "pool_size": len(candidates), "queries": len(queries), "ks": ks,
            "recall": recall_table(ranks, ks, samples, seed, rank_limit=k),
            "overlap_with_exact": {str(j): neighbour_overlap(approx[:, :j], exact[:, :j]) for j in ks},
            "timing": {**{n: round(t, 4) for n, t in timings.items()},
                       "qps": len(queries) / max(timings["search_s"], 1e-9),
                       "exact_qps": len(queries) / max(timings["exact_search_s"], 1e-9)}}


def _exposure_views(views: dict[str, Any]) -> tuple[dict[str, float] | None, int]:
    """View counts, or None when some test note has none (exposure -1): buckets would be meaningless."""
    unknown = sum(1 for v in views.values() if v is None or v < 0)
    return (None, unknown) if unknown else ({i: float(v) for i, v in views.items()}, 0)


def _protocol_options(config: Config, data: dict[str, Any]) -> dict[str, Any]:
    """`retrieval.evaluate_ranking`'s options from the config and the test data."""
    ev = config.retrieval
    # ks=None: the default ks, scaled down to a small test pool (those beyond it are dropped and listed);
    # ks a user set must all fit, else it is an error.
    ks = DEFAULT_KS if ev.ks is None else ev.ks
    return dict(ks=ks, paper_k_ratios=ev.paper_k_ratios, bootstrap_samples=ev.bootstrap_samples,
                seed=ev.bootstrap_seed, categories=data["categories"], clip_ks=ev.ks is None,
                sites=data["sites"], site_groups=ev.site_groups)


def _test_data(config: Config) -> dict[str, Any]:
    data = load_test_data(config.data_dir)
    if not data["test_ids"]:
        raise ValueError(f"{config.data_dir / 'split.json'}: the test set is empty")
    return data


def _relevance_sets(data: dict[str, Any], evaluate) -> dict[str, Any]:
    """`evaluate(pairs, **extra)` on the co-occurrence pairs (with exposure buckets) and the PostLinks."""
    views, views_missing = _exposure_views(data["views"])
    result = {"cooccurrence": evaluate(data["pairs"], views=views),
              "exposure_skipped_notes_without_views": views_missing}
    links = {"pairs_in_file": data["postlinks_in_file"], "pairs_between_test_notes": len(data["postlinks"])}
    if data["postlinks"]:
        links.update(evaluate(data["postlinks"]))
    result["postlinks"] = links
    return result


def evaluate_embeddings(config: Config, emb_dir: str | Path, name: str | None = None,
                        index_dir: str | Path | None = None) -> dict[str, Any]:
    """Every recall metric of one embeddings folder as a JSON-ready dict (see the module docstring)."""
    emb_dir = Path(emb_dir)
    meta = read_embeddings_meta(emb_dir)
    data = _test_data(config)
    test_ids = data["test_ids"]
    ids, vectors = read_embeddings(emb_dir, test_ids)
    common = _protocol_options(config, data)
    result: dict[str, Any] = {
        "model": name or meta.get("model"), "embeddings": str(emb_dir), "dim": meta["dim"],
        "embedded_notes": meta["count"],
        **_relevance_sets(data, lambda pairs, **extra: evaluate_recall(test_ids, ids, vectors, pairs,
                                                                       **common, **extra))}
    result["scann"] = scann_recall(vectors, test_ids, data["pairs"], common["ks"], config,
                                   Path(index_dir) if index_dir else emb_dir / "scann_index")
    return result


def evaluate_lexical(config: Config, name: str = "bm25") -> dict[str, Any]:
    """Every recall metric of BM25 over the test notes' text (`eval.baselines.bm25_scorer`: the index is each
    relevance set's candidate pool); no ScaNN, there are no vectors."""
    from notellm_jax.eval.baselines import bm25_scorer  # tokenizer and bm25s: only when BM25 is scored

    data = _test_data(config)
    score, meta = bm25_scorer(config, data["test_ids"])
    common = _protocol_options(config, data)
    return {"model": name, "kind": "lexical", **meta,
            **_relevance_sets(data, lambda pairs, **extra: evaluate_scored_recall(data["test_ids"], score, pairs,
                                                                                  **common, **extra))}


def with_query_sites(config: Config, result: dict[str, Any]) -> dict[str, Any]:
    """A co-occurrence result written before sites were kept, given its query sites and group tables from the
    test data (the query list rebuilt and checked against its digest); a result that has them, unchanged."""
    if "query_sites" in result or result.get("ranks") is None:
        return result
    data = load_test_data(config.data_dir)
    setup = build_protocol(data["test_ids"], data["pairs"])
    if setup.digest() != result.get("queries_digest"):
        raise InputFormatError(f"the test pairs in {config.data_dir} give query list {setup.digest()}, the result "
                               f"was scored on {result.get('queries_digest')}: not the same queries")
    ev = config.retrieval
    return {**result, **site_group_recall(setup, data["test_ids"], data["sites"], ev.site_groups,
                                          np.asarray(result["ranks"]), result["ks"], ev.bootstrap_samples,
                                          ev.bootstrap_seed)}


def _summary(metrics: dict[str, Any]) -> str:
    co = metrics["cooccurrence"]
    exact = ", ".join(f"R@{k}={v['recall']:.3f}" for k, v in co["recall"].items())
    groups = "; ".join(f"{name} ({g['queries']} queries) " + ", ".join(
        f"R@{k}={v['recall']:.3f}" for k, v in g["recall"].items() if v["recall"] is not None)
        for name, g in (co.get("groups") or {}).items() if name != "all")
    scann = metrics.get("scann")
    search = (f"ScaNN overlap@{scann['ks'][-1]}={scann['overlap_with_exact'][str(scann['ks'][-1])]:.3f}, "
              f"{scann['timing']['qps']:.0f} QPS (exact {scann['timing']['exact_qps']:.0f})" if scann else "no ScaNN")
    return (f"[recall] {metrics['model']}: {co['pairs_kept']} queries, pool {co['pool_size']}: {exact}"
            + (f"; by site group: {groups}" if groups else "")
            + f"; {search}; PostLinks pairs among test notes: {metrics['postlinks']['pairs_between_test_notes']} of "
            f"{metrics['postlinks']['pairs_in_file']}")


def paired_against(config: Config, metrics: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """This result minus another `notellm recall` result (another run, or a report's eval/<model>.recall.json)
    on the same co-occurrence queries, with paired bootstrap intervals at every k both scored, for all queries
    and each site group ("groups"; "difference" is all queries)."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: no such recall result to compare against")
    other = json.loads(path.read_text())
    mine, theirs = metrics["cooccurrence"], other.get("cooccurrence") or {}
    problem = pairing_problem(mine, theirs)
    if problem:
        raise InputFormatError(f"{path} cannot be paired with {metrics['model']}: {problem}")
    ks = [k for k in mine["ks"] if k in theirs.get("ks", ())]
    ev = config.retrieval
    groups = group_differences(mine["ranks"], theirs["ranks"], mine.get("query_sites"), ev.site_groups, ks,
                               ev.bootstrap_samples, ev.bootstrap_seed)
    return {"against": str(path), "model": other.get("model"), "difference": groups["all"], "groups": groups}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--embeddings", help="folder written by embed or baselines")
    source.add_argument("--bm25", action="store_true",
                        help="score the BM25 baseline over the test notes' text instead (no embeddings)")
    parser.add_argument("--name", help="model name in the output (default: the one in embeddings.json)")
    parser.add_argument("--out", help="metrics JSON (default <embeddings>/metrics.json; with --bm25 "
                                      "<work_dir>/eval/bm25.recall.json)")
    parser.add_argument("--against", action="append", metavar="RECALL_JSON",
                        help="another recall result on the same test notes and pairs (repeatable): adds this "
                             "model minus that one, with paired bootstrap intervals")


def run(args, config: Config) -> dict[str, Any]:
    """`notellm recall`: every recall metric of one embeddings folder, written as JSON (with `--against`,
    also its paired differences from other recall results)."""
    if args.bm25:
        metrics = evaluate_lexical(config, args.name or "bm25")
        default_out = config.work_dir / "eval" / f"{metrics['model']}.recall.json"
    else:
        metrics = evaluate_embeddings(config, args.embeddings, args.name)
        default_out = Path(args.embeddings) / "metrics.json"
    metrics["paired"] = [paired_against(config, metrics, path) for path in args.against or ()]
    out = Path(args.out) if args.out else default_out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2))
    print(_summary(metrics))
    for entry in metrics["paired"]:
        for group, difference in entry["groups"].items():
            cells = ", ".join(f"R@{k} {format_difference(d)}" for k, d in difference.items())
            print(f"[recall] {metrics['model']} minus {entry['model']} ({entry['against']}), {group} "
                  f"({next(iter(difference.values()))['queries']} queries), paired 95%: {cells}")
    print(f"[recall] wrote {out}")
    return metrics
