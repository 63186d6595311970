"""Benchmark exact (jnp + top_k) vs ScaNN search on random clustered unit vectors; prints one JSON object.

    python bench/retrieval.py [--num 100000 --dim 128 --queries 2000 --k 10]

Reports queries/s of both (after a warm-up, so jit compilation and ScaNN's first-call setup are
excluded), the ScaNN build time at the default parameters for that index size, and ScaNN's recall
relative to exact search (share of the exact top-k it returns).
"""
from __future__ import annotations

import argparse
import json
import time

from notellm_jax import runtime  # noqa: E402

runtime.set_environment_defaults()
import jax

from notellm_jax.config import RetrievalConfig
from notellm_jax.infer import ann
from notellm_jax.eval.retrieval import exact_topk
from notellm_jax.infer.ann import neighbour_overlap


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=100_000, help="database vectors")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--clusters", type=int, default=0, help="0 = sqrt(num)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-scann", action="store_true",
                        help="exact search only (machines without ScaNN, e.g. the GPU hosts)")
    args = parser.parse_args()

    clusters = args.clusters or round(args.num ** 0.5)
    vectors = ann.clustered_vectors(args.num + args.queries, args.dim, clusters, args.seed)
    queries, database = vectors[:args.queries], vectors[args.queries:]

    exact_topk(queries[:64], database, args.k)  # warm-up: compiles the same block shapes
    (exact, _), exact_s = _timed(exact_topk, queries, database, args.k)

    result = {"num_vectors": len(database), "dim": args.dim, "clusters": clusters, "queries": len(queries),
              "k": args.k, "device": str(jax.devices()[0]), "exact_qps": round(len(queries) / exact_s, 1)}
    if not args.skip_scann:
        result.update(_bench_scann(database, queries, exact, args.k))
    print(json.dumps(result))


def _bench_scann(database, queries, exact, k: int) -> dict:
    params = ann.choose_params(len(database), k, RetrievalConfig())
    searcher, build_s = _timed(ann.build_index, database, k, params)
    ann.search(searcher, queries[:64], k)  # warm-up
    (approx, _), search_s = _timed(ann.search, searcher, queries, k)
    return {"scann_qps": round(len(queries) / search_s, 1), "scann_build_s": round(build_s, 2),
            "scann_params": {"num_leaves": params.num_leaves, "leaves_to_search": params.leaves_to_search,
                             "reorder": params.reorder, "dims_per_block": params.dims_per_block},
            "scann_recall_vs_exact": round(neighbour_overlap(approx, exact), 4)}


if __name__ == "__main__":
    main()
