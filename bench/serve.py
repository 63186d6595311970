"""Load benchmark of the service on loopback; prints one JSON object (and writes it with --out).

    python bench/serve.py [--config configs/tiny.py] [--requests 64] [--out bench/results/serve_cpu.json]

One export (the config's initial weights: the trainer's `load_initial_params` + `save_notellm`, the same
shapes and cost as a trained one) is embedded offline in this process (notes/s of `note_encoder`'s embedder,
after a warm-up, batch = serve.max_batch_size), then served by `python -m notellm_jax.serve` in a subprocess
on 127.0.0.1 for each setting: batching on (serve.max_batch_size) / off (1), prefix cache on / off. For each
setting, 1, 8 and 32 concurrent clients POST /similar with new notes (each a different note, so nothing is
cached), `--requests` requests per level (every loop bounded). Also: one jitted forward of one note (the
1-client latency floor), the prompt tokens per note with and without the prefix cache, and the recall of a
live ScaNN index against exact search after N upserts, before and after a gated rebuild.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import notellm_jax  # noqa: F401
import numpy as np

REPO = Path(__file__).resolve().parents[1]
WORDS = ("coffee espresso grinder burr roast bean water temperature kettle brew ratio crema milk foam acidity "
         "bitterness filter paper press steep minutes grams scale pour over drip").split()


def bench_notes(count: int, seed: int) -> list[dict]:
    """Notes of varied length built from a fixed word list (titles 4-10 words, content 10-60 words)."""
    rng = np.random.default_rng(seed)
    words = lambda n: " ".join(rng.choice(WORDS, size=n))  # noqa: E731
    return [{"title": words(int(rng.integers(4, 11))).capitalize() + "?", "content": words(int(rng.integers(10, 61))),
             "topics": [], "category": "coffee"} for _ in range(count)]


def percentile(values, q):
    return round(float(np.percentile(values, q)) * 1e3, 2)


async def load(port: int, clients: int, requests: int, notes: list[dict]) -> dict:
    import httpx

    latencies: list[float] = []
    queue = list(range(requests))

    async def client(http):
        while queue:  # bounded: stops when the fixed list of requests is used up
            i = queue.pop()
            start = time.perf_counter()
            response = await http.post("/similar", json={"note": notes[i % len(notes)], "k": 10})
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=300, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
    return {"clients": clients, "requests": requests, "notes_per_s": round(requests / wall, 2),
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "p99_over_p50": round(float(np.percentile(latencies, 99) / np.percentile(latencies, 50)), 2)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_load(args, work: Path, export: Path, emb: Path, batch: int, prefix: bool, notes) -> dict:
    import httpx

    port = free_port()
    index = work / f"index-b{batch}-p{int(prefix)}"
    overrides = [x for o in args.overrides for x in ("--set", o)]
    cmd = [sys.executable, "-m", "notellm_jax.serve", "--config", args.config, "--set", f"paths.work_dir={work}",
           "--set", "model.persist_feature_cache=false", *overrides,
           "--set", f"serve.max_batch_size={batch}", "--set", f"embed.prefix_cache={str(prefix).lower()}",
           "--export", str(export), "--index", str(index), "--embeddings", str(emb), "--port", str(port)]
    log = open(work / f"server-b{batch}-p{int(prefix)}.log", "wb")
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        start, deadline = time.perf_counter(), time.time() + 600
        while time.time() < deadline:  # bounded wait for start-up (imports, load, warm-up compiles)
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {(work / log.name).read_text()}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        startup = time.perf_counter() - start
        levels = [asyncio.run(load(port, c, args.requests, notes[c:])) for c in args.levels]
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        batches = [line for line in metrics.splitlines() if line.startswith("notellm_embed_batch_size_")
                   and ("_sum" in line or "_count" in line)]
        return {"max_batch_size": batch, "prefix_cache": prefix, "startup_s": round(startup, 1), "levels": levels,
                "batch_size_metric": batches}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def offline(config, export, notes) -> dict:
    """Offline embed throughput (notes/s) of the same export, and one jitted forward of one note."""
    from notellm_jax.config import override
    from notellm_jax.data.prompts import Note

    from notellm_jax.eval.embed import note_encoder

    out = {}
    for prefix in (True, False):
        encoder = note_encoder(override(config, {"embed.prefix_cache": prefix}), export,
                               batch_size=config.serve.max_batch_size)
        tokens = [encoder.tokens(Note(f"b{i}", n["title"], n["content"], [], "c")) for i, n in enumerate(notes)]
        encoder.embedder(tokens)  # warm-up: compiles every bucket used
        start = time.perf_counter()
        encoder.embedder(tokens)
        seconds = time.perf_counter() - start
        one = []
        for t in tokens[:5]:
            start = time.perf_counter()
            encoder.embedder([t])
            one.append(time.perf_counter() - start)
        out["prefix_on" if prefix else "prefix_off"] = {
            "notes_per_s": round(len(tokens) / seconds, 2), "one_note_forward_ms": round(float(np.median(one)) * 1e3, 2),
            "prefix_tokens": len(encoder.prefix), "mean_tokens_run_per_note": round(float(np.mean([len(t) for t in tokens])), 1),
            "buckets": encoder.buckets}
    return out


def live_index_recall(num: int, upserts: int, dim: int, work: Path) -> dict:
    """Recall@10 vs exact of a live tree index built on `num` vectors after `upserts` more arrive."""
    from notellm_jax.config import RetrievalConfig
    from notellm_jax.eval import ann
    from notellm_jax.serve.index import LiveIndex

    vectors = ann.clustered_vectors(num + upserts, dim, round((num + upserts) ** 0.5), seed=0)
    index = LiveIndex.create(work / "recall-index", [f"n{i}" for i in range(num)], vectors[:num], {}, RetrievalConfig(), k=10)
    built_with = dataclasses.asdict(index.params)
    start = time.perf_counter()
    for i in range(num, num + upserts):
        index.upsert(f"n{i}", vectors[i])
    upsert_s = time.perf_counter() - start
    before = index.recall_vs_exact(10, 1000)
    rebuild = index.rebuild(10, min_recall=0.95, sample=1000)
    return {"base": num, "upserts": upserts, "dim": dim, "params_at_build": built_with,
            "upsert_per_s_fsynced": round(upserts / upsert_s, 1), "recall_at_10_after_upserts": round(before, 4),
            "rebuild": rebuild}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.py"))
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--index-notes", type=int, default=256)
    parser.add_argument("--recall-base", type=int, default=20_000)
    parser.add_argument("--recall-upserts", type=int, default=5_000, help="0 = skip the live-index recall part")
    parser.add_argument("--levels", type=lambda t: [int(x) for x in t.split(",")], default=[1, 8, 32],
                        help="concurrent clients per level")
    parser.add_argument("--settings", default="on/on,off/on,on/off",
                        help="batching/prefix-cache settings to serve, e.g. on/on,off/on,on/off")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    parser.add_argument("--out")
    args = parser.parse_args()

    from notellm_jax.config import load_config
    from notellm_jax.data.prompts import Note
    from notellm_jax.eval.embed import embed_notes
    from notellm_jax.weights.export import save_notellm
    from notellm_jax.weights.tokenizer import resolve_tokenizer
    from notellm_jax.weights.loading import load_initial_params

    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    config = load_config(args.config, [f"paths.work_dir={work}", "model.persist_feature_cache=false", *args.overrides],
                         environ=os.environ)
    tokenizer = resolve_tokenizer(config)
    params, llama_cfg = load_initial_params(config, tokenizer.vocab_size)
    export = save_notellm(work / "export", params, llama_cfg, config)
    stored = [Note(f"s{i}", n["title"], n["content"], [], "coffee")
              for i, n in enumerate(bench_notes(args.index_notes, seed=1))]
    emb = embed_notes(config, export, stored, work / "emb")
    notes = bench_notes(args.requests + 32, seed=2)
    result = {"benchmark": "serve", "config": args.config, "model": config.model.checkpoint,
              "machine": f"{platform.node()} ({os.cpu_count()} CPUs, shared with other jobs)",
              "index_notes": args.index_notes, "offline": offline(config, export, notes[:64]), "settings": []}
    for setting in args.settings.split(","):
        batching, prefix = (part == "on" for part in setting.split("/"))
        batch = config.serve.max_batch_size if batching else 1
        result["settings"].append(serve_and_load(args, work, export, emb, batch, prefix, notes))
    if args.recall_upserts:
        result["live_index"] = live_index_recall(args.recall_base, args.recall_upserts, 128, work)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
