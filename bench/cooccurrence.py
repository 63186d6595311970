"""Co-occurrence throughput, in-memory engine and Beam local runner, on synthetic logs; prints JSON.

    python bench/cooccurrence.py [--sizes 1000000,10000000,30000000] [--engines memory,beam]
        [--beam-max-events 10000000] [--min-free-gib 6] [--out bench/results/cooccurrence_cpu.json]

Each (engine, size) runs in a fresh subprocess on a log from notellm_jax.data.synthetic (default
SyntheticLog parameters: Pareto user activity, Zipf note popularity, time-ordered sessions), written to
a temporary events.parquet first (not timed). Timed: reading events.parquet, the scores, and the
selection with the paper's u=30, l=0.01, t=10 -- for "memory" cooccurrence.related_pairs, for "beam"
beam_prepare.related_pairs on the DirectRunner with 2 worker processes (multi_processing). Peak memory
is the largest sum of RSS over the subprocess and all its descendants (Beam's workers), sampled every
0.2 s. A run is skipped, and said so, when the machine's available memory is below --min-free-gib
before it starts or (beam) the size exceeds --beam-max-events.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_one(engine: str, num_events: int) -> dict:
    import notellm_jax  # noqa: F401
    from notellm_jax.config import DataConfig
    from notellm_jax.data import store
    from notellm_jax.data.synthetic import SyntheticLog, generate

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.parquet"
        _, events = generate(SyntheticLog(num_events=num_events))
        store.write_events(events, path)
        del events
        data = DataConfig(beam_options=("--direct_num_workers=2", "--direct_running_mode=multi_processing"))
        print("READY", flush=True)  # the parent's memory sampler starts its peak here
        start, cpu = time.perf_counter(), time.process_time()
        if engine == "memory":
            from notellm_jax.data.cooccurrence import related_pairs

            _, counts = related_pairs(store.read_events(path), data)
        else:
            from notellm_jax.data import beam_prepare

            _, counts = beam_prepare.related_pairs(path, data, Path(tmp) / "beam")
            counts.pop("beam_seconds")
        seconds = time.perf_counter() - start
        return {"engine": engine, "events": num_events, "seconds": round(seconds, 2),
                "events_per_second": round(num_events / seconds),
                "events_per_minute_millions": round(num_events / seconds * 60 / 1e6, 2),
                # CPU of the driver process only (Beam's work runs in its worker processes).
                "driver_cpu_seconds": round(time.process_time() - cpu, 2), **counts}


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def measure(engine: str, size: int) -> dict:
    """Run one size in a subprocess; its JSON plus peak tree RSS (from the READY line on) and CPU."""
    child = subprocess.Popen([sys.executable, __file__, "--one", f"{engine}:{size}"], stdout=subprocess.PIPE,
                             text=True, cwd=ROOT)
    proc, peak, ready, stop = psutil.Process(child.pid), [0], threading.Event(), threading.Event()

    def sample() -> None:
        while not stop.is_set():
            if ready.is_set():
                peak[0] = max(peak[0], _tree_rss(proc))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines = []
    for line in child.stdout:
        if line.startswith("READY"):
            ready.set()
        lines.append(line)
    child.wait()
    stop.set()
    sampler.join()
    if child.returncode:
        return {"engine": engine, "events": size, "failed": f"exit code {child.returncode}"}
    return {**json.loads(lines[-1]), "peak_rss_gib": round(peak[0] / 2**30, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000000,10000000,30000000")
    parser.add_argument("--engines", default="memory,beam")
    parser.add_argument("--beam-max-events", type=int, default=10_000_000)
    parser.add_argument("--min-free-gib", type=float, default=6.0)
    parser.add_argument("--out", default="")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process: engine:size
    args = parser.parse_args()
    if args.one:
        engine, size = args.one.split(":")
        print(json.dumps(run_one(engine, int(size))))
        return
    runs = []
    for engine in args.engines.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            free = psutil.virtual_memory().available / 2**30
            if engine == "beam" and size > args.beam_max_events:
                runs.append({"engine": engine, "events": size, "skipped": f"over --beam-max-events"})
            elif free < args.min_free_gib:
                runs.append({"engine": engine, "events": size, "skipped": f"{free:.1f} GiB available"})
            else:
                runs.append(measure(engine, size))
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    result = {"benchmark": "cooccurrence", "machine": f"{platform.machine()} {os.cpu_count()} cores, "
              f"{psutil.virtual_memory().total / 2**30:.0f} GiB (shared with other jobs)",
              "load_average_at_end": os.getloadavg(), "runs": runs}
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
