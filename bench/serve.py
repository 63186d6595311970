"""Load benchmark of the service on loopback; prints one JSON object (and writes it with --out).

    python bench/serve.py [--config configs/tiny.py] [--requests 64] [--out bench/results/serve/DATE-cpu-tiny.json]
    python bench/serve.py --config configs/smollm2_se.py --set model.train_top_layers=0 \
        --out bench/results/serve/DATE-cpu-smollm2.json  (SmolLM2-135M from its GGUF, every layer in the export)

One export (the config's initial weights: the trainer's `load_initial_params` + `save_notellm`, the same
shapes and cost as a trained one) is embedded offline in this process (notes/s of `note_encoder`'s embedder,
after a warm-up, batch = serve.max_batch_size), then served by `python -m notellm_jax.serve` in a subprocess
on 127.0.0.1 for each setting: batching on (serve.max_batch_size) / off (1), prefix cache on / off. For each
setting, 1, 8 and 32 concurrent clients POST /similar with new notes (each a different note, so nothing is
cached), `--requests` requests per level (every loop bounded). Also: one jitted forward of one note (the
1-client latency floor), the prompt tokens per note with and without the prefix cache, and the recall of a
live ScaNN index against exact search after N upserts, before and after a gated rebuild. The machine's
`uptime` load is recorded before and after (the CPUs may be shared), and the issue's goals are computed
from the measurements (`goals`).
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

import numpy as np

from notellm_jax.runtime import cpu_model

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


def upsert_and_rebuild(port: int, upserts: int, stored: int) -> dict:
    """PUT `upserts` new notes (one client), then POST /index/rebuild: the live index's recall@10 against exact
    search after the upserts, and the retrained one's (promoted at serve.rebuild_min_recall)."""
    import httpx

    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as http:
        start = time.perf_counter()
        for i, note in enumerate(bench_notes(upserts, seed=3)):
            http.put(f"/notes/new-{i}", json=note).raise_for_status()
        seconds = time.perf_counter() - start
        report = http.post("/index/rebuild", json={"k": 10, "sample": stored + upserts}).json()
    return {"stored": stored, "upserts": upserts, "upsert_per_s": round(upserts / seconds, 2), "rebuild": report}


def serve_and_load(args, work: Path, export: Path, emb: Path, batch: int, prefix: bool, notes,
                   upserts: int = 0) -> dict:
    import httpx

    port = free_port()
    index = work / f"index-b{batch}-p{int(prefix)}"
    overrides = [x for o in args.overrides for x in ("--set", o)]
    cmd = [sys.executable, "-m", "notellm_jax.serve", "--config", args.config, "--set", f"paths.work_dir={work}",
           "--set", "model.persist_feature_cache=false", *overrides,
           "--set", f"serve.max_batch_size={batch}", "--set", f"embed.prefix_cache={str(prefix).lower()}",
           "--set", f"retrieval.scann_num_leaves={args.index_leaves}",
           "--set", f"retrieval.scann_leaves_to_search={args.index_leaves_searched}",
           "--export", str(export), "--index", str(index), "--embeddings", str(emb), "--port", str(port)]
    log = open(work / f"server-b{batch}-p{int(prefix)}.log", "wb")
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        start, deadline = time.perf_counter(), time.time() + args.startup_timeout
        while True:  # bounded wait for start-up (imports, load, warm-up compiles)
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {Path(log.name).read_text()}")
            if time.time() > deadline:
                raise TimeoutError(f"server not up after {args.startup_timeout} s: {Path(log.name).read_text()}")
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
        out = {"max_batch_size": batch, "prefix_cache": prefix, "startup_s": round(startup, 1), "levels": levels,
               "batch_size_metric": batches}
        if upserts:
            out["served_index"] = upsert_and_rebuild(port, upserts, args.index_notes)
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # still compiling: SIGTERM waits for the start-up to end
            proc.kill()
            proc.wait(timeout=60)
        log.close()


def offline(config, export, notes) -> dict:
    """Offline embed throughput (notes/s, full batches of serve.max_batch_size) of the same export, and one
    jitted forward of one note alone (a batch of one row: the 1-client latency floor)."""
    from notellm_jax.config import override
    from notellm_jax.data.prompts import Note
    from notellm_jax.infer.encoder import note_encoder

    out = {}
    for prefix in (True, False):
        encoder = note_encoder(override(config, {"embed.prefix_cache": prefix}), export,
                               batch_size=config.serve.max_batch_size, row_buckets=[1])
        tokens = [encoder.tokens(Note(f"b{i}", n["title"], n["content"], [], "c")) for i, n in enumerate(notes)]
        encoder.embedder(tokens)  # warm-up: compiles every bucket used
        start = time.perf_counter()
        encoder.embedder(tokens)
        seconds = time.perf_counter() - start
        one = []
        for t in tokens[:5] * 2:  # the first round compiles the one-row shapes
            start = time.perf_counter()
            encoder.embedder([t])
            one.append(time.perf_counter() - start)
        one = one[5:]
        out["prefix_on" if prefix else "prefix_off"] = {
            "notes_per_s": round(len(tokens) / seconds, 2), "one_note_forward_ms": round(float(np.median(one)) * 1e3, 2),
            "prefix_tokens": len(encoder.prefix), "mean_tokens_run_per_note": round(float(np.mean([len(t) for t in tokens])), 1),
            "buckets": encoder.buckets}
    return out


def live_index_recall(num: int, upserts: int, dim: int, work: Path) -> dict:
    """Recall@10 vs exact of a live tree index built on `num` vectors after `upserts` more arrive."""
    from notellm_jax.config import RetrievalConfig
    from notellm_jax.infer import ann
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


def machine() -> str:
    return f"{platform.node()}: {os.cpu_count()} CPUs ({cpu_model()}), shared with other jobs"


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()


def goals(result: dict) -> dict:
    """The issue's goals from the measurements (None where the run did not measure the inputs)."""
    offline_on, offline_off = result["offline"]["prefix_on"], result["offline"]["prefix_off"]
    served = {(s["max_batch_size"] > 1, s["prefix_cache"]): {lv["clients"]: lv for lv in s["levels"]}
              for s in result["settings"]}
    main = served.get((True, True), {})
    out = {"prefix_template_share": round(1 - offline_on["mean_tokens_run_per_note"]
                                          / offline_off["mean_tokens_run_per_note"], 3),
           "prefix_compute_cut_offline": round(1 - offline_off["notes_per_s"] / offline_on["notes_per_s"], 3)}
    if 32 in main:
        out["throughput_32_over_offline (goal >= 0.8)"] = round(main[32]["notes_per_s"] / offline_on["notes_per_s"], 3)
        out["p99_over_p50_32 (goal <= 3)"] = main[32]["p99_over_p50"]
    if 1 in main:
        out["p50_1_over_one_forward (goal <= 1.3)"] = round(main[1]["p50_ms"] / offline_on["one_note_forward_ms"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.py"))
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--index-notes", type=int, default=256)
    parser.add_argument("--index-leaves", type=int, default=16,
                        help="ScaNN tree leaves of the served index (0 = by size: brute force for a small one)")
    parser.add_argument("--index-leaves-searched", type=int, default=4, help="0 = by size (a tenth)")
    parser.add_argument("--upserts", type=int, default=64,
                        help="new notes PUT after the first setting's load, then a rebuild (0 = none)")
    parser.add_argument("--recall-base", type=int, default=20_000)
    parser.add_argument("--recall-upserts", type=int, default=5_000, help="0 = skip the live-index recall part")
    parser.add_argument("--levels", type=lambda t: [int(x) for x in t.split(",")], default=[1, 8, 32],
                        help="concurrent clients per level")
    parser.add_argument("--settings", default="on/on,off/on,on/off",
                        help="batching/prefix-cache settings to serve, e.g. on/on,off/on,on/off")
    parser.add_argument("--startup-timeout", type=float, default=1800, help="seconds a server may take to start")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    parser.add_argument("--out")
    args = parser.parse_args()

    from notellm_jax.config import load_config
    from notellm_jax.data.prompts import Note
    from notellm_jax.infer.embed import embed_notes
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
    result = {"benchmark": "serve", "config": args.config, "overrides": args.overrides,
              "model": config.model.checkpoint, "machine": machine(), "load_before": uptime(),
              "index_notes": args.index_notes, "offline": offline(config, export, notes[:64]), "settings": []}
    for number, setting in enumerate(args.settings.split(",")):
        batching, prefix = (part == "on" for part in setting.split("/"))
        batch = config.serve.max_batch_size if batching else 1
        result["settings"].append(serve_and_load(args, work, export, emb, batch, prefix, notes,
                                                 args.upserts if number == 0 else 0))
    if args.recall_upserts:
        result["live_index"] = live_index_recall(args.recall_base, args.recall_upserts, config.model.emb_dim, work)
    result["load_after"] = uptime()
    result["goals"] = goals(result)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
