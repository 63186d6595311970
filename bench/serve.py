"""Load benchmark of the service on loopback; prints one JSON object (and writes it with --out).

    python bench/serve.py --small    (about 2 minutes on 2 cores: the tiny model, the main setting with and
                                      without keys, the /healthz probes and the restarts)
    python bench/serve.py [--config configs/tiny.py] [--requests 128] [--out bench/results/serve/DATE-cpu-tiny.json]
    python bench/serve.py --config configs/smollm2_se.py --set model.train_top_layers=0 \
        --out bench/results/serve/DATE-cpu-smollm2.json  (SmolLM2-135M from its GGUF, every layer in the export)

One export (the config's initial weights: the trainer's `load_initial_params` + `save_notellm`, the same
shapes and cost as a trained one) is embedded offline in this process (notes/s of `note_encoder`'s embedder,
after a warm-up, batch = serve.max_batch_size), then served by `python -m notellm_jax.serve` in a subprocess
on 127.0.0.1 for each setting: batching on (serve.max_batch_size) / off (1), prefix cache on / off, API keys
on / off (`/keys`: every request carries a Bearer key). For each setting, 1, 8, 32 and 128 concurrent clients
POST /similar with new notes (each a different note, so nothing is cached), `--requests` requests per level
(every loop bounded); p50, p99 and notes/s, against the offline embedder measured in the same run. Then, on
one server, 8 clients probe /healthz (idle, then while one client posts a 10 MB body `--big-posts` times, then
while it posts the largest body the limits accept); then restart-to-ready with an empty JAX compilation cache
(cold) and with the cache it filled (warm). Also: one jitted forward of one note (the 1-client latency floor),
the prompt tokens per note with and without the prefix cache, and the recall of a live ScaNN index against
exact search after N upserts, before and after a gated rebuild. The machine's `uptime` load is recorded before
and after (the CPUs may be shared), and the issue's goals are computed from the measurements (`goals`).
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


async def load(port: int, clients: int, requests: int, notes: list[dict], headers: dict) -> dict:
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
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=300, limits=limits,
                                 headers=headers) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
    return {"clients": clients, "requests": requests, "notes_per_s": round(requests / wall, 2),
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "p99_over_p50": round(float(np.percentile(latencies, 99) / np.percentile(latencies, 50)), 2)}


async def probe_healthz(port: int, probes: int, stop: asyncio.Event) -> list[float]:
    """`probes` clients, each GET /healthz one after another until `stop`: every latency."""
    import httpx

    latencies: list[float] = []

    async def probe(http):
        while not stop.is_set():
            start = time.perf_counter()
            (await http.get("/healthz")).raise_for_status()
            latencies.append(time.perf_counter() - start)
            await asyncio.sleep(0.01)

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        await asyncio.gather(*(probe(http) for _ in range(probes)))
    return latencies


async def healthz_during(port: int, body: bytes, posts: int, headers: dict, probes: int = 8) -> dict:
    """/healthz latency of `probes` clients while one client posts `body` to /embed `posts` times, one after
    another (and, for comparison, the same probes with nothing else running)."""
    import httpx

    async def poster(stop: asyncio.Event) -> list[str]:
        answers = []
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120, headers=headers) as http:
            for _ in range(posts):
                try:
                    response = await http.post("/embed", content=body, headers={"content-type": "application/json"})
                    answers.append(str(response.status_code))
                except httpx.TransportError as e:  # a server may close the connection on a refused body
                    answers.append(type(e).__name__)
        stop.set()
        return answers

    async def idle(stop: asyncio.Event) -> None:
        await asyncio.sleep(2)
        stop.set()

    out = {}
    for name, other in (("idle", idle), ("busy", poster)):
        stop = asyncio.Event()
        latencies, answers = await asyncio.gather(probe_healthz(port, probes, stop), other(stop))
        out[name] = {"probes": len(latencies), "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
                     "max_ms": round(max(latencies) * 1e3, 2)}
        if answers is not None:
            out[name]["answers"] = sorted(set(answers))
    return {"body_bytes": len(body), "posts": posts, **out}


def big_bodies(config) -> dict[str, bytes]:
    """A 10 MB body (256 topics of 40 KB, the issue's case: refused by its size) and the largest body the limits
    let through (every note at every cap: tokenised, embedded)."""
    cfg = config.serve
    ten_mb = json.dumps({"notes": [{"title": "t", "topics": ["x" * 40_000] * 256}]}).encode()
    note = {"title": "t" * cfg.max_title_chars, "content": "brew " * (cfg.max_content_chars // 5),
            "category": "c" * cfg.max_category_chars, "topics": ["brewing", "espresso"]}  # topics: whole in the prompt
    return {"10MB": ten_mb, "max_allowed": json.dumps({"notes": [note] * cfg.max_notes_per_request}).encode()}


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


def start_server(args, work: Path, export: Path, emb: Path, tag: str, batch: int, prefix: bool,
                 keys: Path | None = None, cache: Path | None = None) -> tuple[subprocess.Popen, int, dict]:
    """`python -m notellm_jax.serve` on a free port; returns once /readyz says 200, with the seconds from the
    launch to the first /healthz answer (the port bound, before any loading) and to ready."""
    import httpx

    port = free_port()
    overrides = [x for o in args.overrides for x in ("--set", o)]
    cmd = [sys.executable, "-m", "notellm_jax.serve", "--config", args.config, "--set", f"paths.work_dir={work}",
           "--set", "model.persist_feature_cache=false", *overrides,
           "--set", f"serve.max_batch_size={batch}", "--set", f"embed.prefix_cache={str(prefix).lower()}",
           "--set", f"retrieval.scann_num_leaves={args.index_leaves}",
           "--set", f"retrieval.scann_leaves_to_search={args.index_leaves_searched}",
           "--set", f"serve.compilation_cache_dir={cache or work / 'jax-cache'}",  # shared: one cold compile
           "--export", str(export), "--index", str(work / f"index-{tag}"), "--embeddings", str(emb),
           "--port", str(port), *(["--api-key-file", str(keys)] if keys else [])]
    log = open(work / f"server-{tag}.log", "ab")
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log,
                            stderr=subprocess.STDOUT)
    log.close()
    start, deadline, alive = time.perf_counter(), time.time() + args.startup_timeout, None
    while True:  # bounded wait for start-up (imports, load, warm-up compiles)
        if proc.poll() is not None or time.time() > deadline:
            stop_server(proc)
            raise RuntimeError(f"server {tag} did not get ready: {(work / f'server-{tag}.log').read_text()}")
        try:
            if alive is None and httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                alive = time.perf_counter() - start
            if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    return proc, port, {"to_healthz_s": round(alive or 0.0, 2), "to_ready_s": round(time.perf_counter() - start, 2)}


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:  # still compiling: SIGTERM waits for the start-up to end
        proc.kill()
        proc.wait(timeout=60)


def metric_lines(port: int, headers: dict) -> list[str]:
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", headers=headers).text
    return [line for line in text.splitlines() if line.startswith(("te_batch_next_size_", "notellm_batch_fill_",
            "te_embed_queue_duration_", "te_embed_inference_duration_", "te_embed_tokenization_duration_"))
            and ("_sum" in line or "_count" in line)]


def serve_and_load(args, work: Path, export: Path, emb: Path, batch: int, prefix: bool, notes,
                   upserts: int = 0, keys: Path | None = None) -> dict:
    tag = f"b{batch}-p{int(prefix)}-k{int(keys is not None)}"
    proc, port, startup = start_server(args, work, export, emb, tag, batch, prefix, keys)
    headers = {"authorization": f"Bearer {KEY}"} if keys else {}
    try:
        levels = [asyncio.run(load(port, c, max(args.requests, c), notes[c:], headers)) for c in args.levels]
        out = {"max_batch_size": batch, "prefix_cache": prefix, "keys": keys is not None, "startup": startup,
               "levels": levels, "batch_metrics": metric_lines(port, headers)}
        if upserts:
            out["served_index"] = upsert_and_rebuild(port, upserts, args.index_notes)
        return out
    finally:
        stop_server(proc)


def restart(args, work: Path, export: Path, emb: Path) -> dict:
    """Launch-to-ready with an empty compilation cache (cold), then again with the cache it filled (warm)."""
    cache = work / "jax-cache-restart"
    times = {}
    for kind in ("cold", "warm"):
        proc, _, times[kind] = start_server(args, work, export, emb, f"restart-{kind}", args.max_batch, True,
                                            cache=cache)
        stop_server(proc)
    times["cold_over_warm"] = round(times["cold"]["to_ready_s"] / times["warm"]["to_ready_s"], 2)
    return times


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
    served = {(s["max_batch_size"] > 1, s["prefix_cache"], s["keys"]): {lv["clients"]: lv for lv in s["levels"]}
              for s in result["settings"]}
    main, keyed = served.get((True, True, False), {}), served.get((True, True, True), {})
    out = {"prefix_template_share": round(1 - offline_on["mean_tokens_run_per_note"]
                                          / offline_off["mean_tokens_run_per_note"], 3),
           "prefix_compute_cut_offline": round(1 - offline_off["notes_per_s"] / offline_on["notes_per_s"], 3)}
    if 32 in main:
        out["throughput_32_over_offline (goal >= 0.9)"] = round(main[32]["notes_per_s"] / offline_on["notes_per_s"], 3)
        out["p99_over_p50_32 (goal <= 3)"] = main[32]["p99_over_p50"]
    if 32 in keyed and 32 in main:
        out["throughput_32_keys_over_no_keys"] = round(keyed[32]["notes_per_s"] / main[32]["notes_per_s"], 3)
    if 1 in main:
        out["p50_1_over_one_forward (goal <= 1.3)"] = round(main[1]["p50_ms"] / offline_on["one_note_forward_ms"], 3)
    if "healthz_10MB" in result:
        out["healthz_p99_ms_during_10MB (goal < 100)"] = result["healthz_10MB"]["busy"]["p99_ms"]
    if "restart" in result:
        out["restart_cold_over_warm (goal >= 3)"] = result["restart"]["cold_over_warm"]
    return out


KEY = "bench-admin-key-0123456789"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.py"))
    parser.add_argument("--small", action="store_true", help="about 2 minutes on 2 cores: tiny model, 32 requests "
                        "a level, one setting with and without keys, no upserts or live-index recall")
    parser.add_argument("--requests", type=int, default=128, help="requests per concurrency level (at least the "
                        "clients)")
    parser.add_argument("--index-notes", type=int, default=256)
    parser.add_argument("--index-leaves", type=int, default=16,
                        help="ScaNN tree leaves of the served index (0 = by size: brute force for a small one)")
    parser.add_argument("--index-leaves-searched", type=int, default=4, help="0 = by size (a tenth)")
    parser.add_argument("--upserts", type=int, default=64,
                        help="new notes PUT after the first setting's load, then a rebuild (0 = none)")
    parser.add_argument("--recall-base", type=int, default=20_000)
    parser.add_argument("--recall-upserts", type=int, default=5_000, help="0 = skip the live-index recall part")
    parser.add_argument("--levels", type=lambda t: [int(x) for x in t.split(",")], default=[1, 8, 32, 128],
                        help="concurrent clients per level")
    parser.add_argument("--settings", default="on/on,on/on/keys,off/on,on/off",
                        help="batching/prefix-cache[/keys] settings to serve")
    parser.add_argument("--big-posts", type=int, default=5, help="10 MB posts while 8 clients probe /healthz")
    parser.add_argument("--startup-timeout", type=float, default=1800, help="seconds a server may take to start")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.small:
        args.requests, args.index_notes, args.upserts, args.recall_upserts = 32, 64, 0, 0
        args.settings, args.big_posts = "on/on,on/on/keys", 3
        args.overrides = ["embed.length_buckets=2", *args.overrides]  # 8 compiled shapes, not 16
    return args


def loaded_and_limits(args, config, work, export, emb, notes, result: dict, save) -> None:
    """Every setting's load, then /healthz under a 10 MB body and a maximum allowed one, then the restarts, into
    `result` (`save`d after each part: a run cut short keeps what it measured)."""
    result["settings"] = []
    keys = work / "keys"
    keys.write_text(f"admin {KEY}\n")
    args.max_batch = config.serve.max_batch_size
    for number, setting in enumerate(args.settings.split(",")):
        batching, prefix, *keyed = setting.split("/")
        batch = config.serve.max_batch_size if batching == "on" else 1
        result["settings"].append(serve_and_load(args, work, export, emb, batch, prefix == "on", notes,
                                                 args.upserts if number == 0 else 0, keys if keyed else None))
        save(result)
    proc, port, _ = start_server(args, work, export, emb, "limits", config.serve.max_batch_size, True)
    try:
        bodies = big_bodies(config)
        result["healthz_10MB"] = asyncio.run(healthz_during(port, bodies["10MB"], args.big_posts, {}))
        result["healthz_max_allowed"] = asyncio.run(healthz_during(port, bodies["max_allowed"], args.big_posts, {}))
    finally:
        stop_server(proc)
    save(result)
    result["restart"] = restart(args, work, export, emb)


def main() -> None:
    args = parse_args()
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
    notes = bench_notes(args.requests + max(args.levels), seed=2)
    result = {"benchmark": "serve", "config": args.config, "overrides": args.overrides, "small": args.small,
              "model": config.model.checkpoint, "machine": machine(), "load_before": uptime(),
              "index_notes": args.index_notes, "offline": offline(config, export, notes[:64])}

    def save(partial: dict) -> None:
        print(f"[bench] measured: {', '.join(partial)}", file=sys.stderr, flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            so_far = {**partial, "goals": goals(partial) if partial.get("settings") else None, "complete": False}
            Path(args.out).write_text(json.dumps(so_far, indent=1) + "\n")

    save(result)
    loaded_and_limits(args, config, work, export, emb, notes, result, save)
    if args.recall_upserts:
        result["live_index"] = live_index_recall(args.recall_base, args.recall_upserts, config.model.emb_dim, work)
    result["load_after"] = uptime()
    result["goals"] = goals(result)
    result["complete"] = True
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
