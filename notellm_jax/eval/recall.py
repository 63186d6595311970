"""Recall evaluation of one embeddings folder: `notellm recall --config ... --embeddings DIR`.

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
from notellm_jax.errors import InputFormatError, MissingInputError
from notellm_jax.eval.retrieval import (build_protocol, evaluate_recall, exact_topk, format_difference,
                                        paired_difference, pairing_problem, ranks_from_neighbours, recall_table)
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


def evaluate_embeddings(config: Config, emb_dir: str | Path, name: str | None = None,
                        index_dir: str | Path | None = None) -> dict[str, Any]:
    """Every recall metric of one embeddings folder as a JSON-ready dict (see the module docstring)."""
    emb_dir = Path(emb_dir)
    meta = read_embeddings_meta(emb_dir)
    data = load_test_data(config.data_dir)
    test_ids = data["test_ids"]
    if not test_ids:
        raise ValueError(f"{config.data_dir / 'split.json'}: the test set is empty")
    ids, vectors = read_embeddings(emb_dir, test_ids)
    views, views_missing = _exposure_views(data["views"])
    ev = config.retrieval
    # ks=None: the default ks, scaled down to a small test pool (those beyond it are dropped and listed);
    # ks a user set must all fit, else it is an error.
    ks = DEFAULT_KS if ev.ks is None else ev.ks
    common = dict(ks=ks, paper_k_ratios=ev.paper_k_ratios, bootstrap_samples=ev.bootstrap_samples,
                  seed=ev.bootstrap_seed, categories=data["categories"], clip_ks=ev.ks is None)
    result: dict[str, Any] = {
        "model": name or meta.get("model"), "embeddings": str(emb_dir), "dim": meta["dim"],
        "embedded_notes": meta["count"],
        "cooccurrence": evaluate_recall(test_ids, ids, vectors, data["pairs"], views=views, **common),
        "exposure_skipped_notes_without_views": views_missing,
    }
    links = {"pairs_in_file": data["postlinks_in_file"], "pairs_between_test_notes": len(data["postlinks"])}
    if data["postlinks"]:
        links.update(evaluate_recall(test_ids, ids, vectors, data["postlinks"], **common))
    result["postlinks"] = links
    result["scann"] = scann_recall(vectors, test_ids, data["pairs"], ks, config,
                                   Path(index_dir) if index_dir else emb_dir / "scann_index")
    return result


def _summary(metrics: dict[str, Any]) -> str:
    recall = metrics["cooccurrence"]["recall"]
    exact = ", ".join(f"R@{k}={v['recall']:.3f}" for k, v in recall.items())
    scann = metrics["scann"]
    overlap = scann["overlap_with_exact"][str(scann["ks"][-1])]
    return (f"[recall] {metrics['model']}: {metrics['cooccurrence']['pairs_kept']} queries, pool "
            f"{metrics['cooccurrence']['pool_size']}: {exact}; ScaNN overlap@{scann['ks'][-1]}={overlap:.3f}, "
            f"{scann['timing']['qps']:.0f} QPS (exact {scann['timing']['exact_qps']:.0f}); PostLinks pairs "
            f"among test notes: {metrics['postlinks']['pairs_between_test_notes']} of "
            f"{metrics['postlinks']['pairs_in_file']}")


def paired_against(config: Config, metrics: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """This result minus another `notellm recall` result (another run, or a report's eval/<model>.recall.json)
    on the same co-occurrence queries, with paired bootstrap intervals at every k both scored."""
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
    difference = paired_difference(mine["ranks"], theirs["ranks"], ks, ev.bootstrap_samples, ev.bootstrap_seed)
    return {"against": str(path), "model": other.get("model"), "difference": difference}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--embeddings", required=True, help="folder written by embed or baselines")
    parser.add_argument("--name", help="model name in the output (default: the one in embeddings.json)")
    parser.add_argument("--out", help="metrics JSON (default <embeddings>/metrics.json)")
    parser.add_argument("--against", action="append", metavar="RECALL_JSON",
                        help="another recall result on the same test notes and pairs (repeatable): adds this "
                             "model minus that one, with paired bootstrap intervals")


def run(args, config: Config) -> dict[str, Any]:
    """`notellm recall`: every recall metric of one embeddings folder, written as JSON (with `--against`,
    also its paired differences from other recall results)."""
    metrics = evaluate_embeddings(config, args.embeddings, args.name)
    metrics["paired"] = [paired_against(config, metrics, path) for path in args.against or ()]
    out = Path(args.out) if args.out else Path(args.embeddings) / "metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2))
    print(_summary(metrics))
    for entry in metrics["paired"]:
        cells = ", ".join(f"R@{k} {format_difference(d)}" for k, d in entry["difference"].items())
        print(f"[recall] {metrics['model']} minus {entry['model']} ({entry['against']}), paired 95%: {cells}")
    print(f"[recall] wrote {out}")
    return metrics
