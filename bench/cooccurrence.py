"""Co-occurrence throughput on synthetic behaviour logs; prints one JSON object.

    python bench/cooccurrence.py [--sizes 1000000,10000000] [--window-days 0]

Reports wall and CPU seconds of `cooccurrence_scores` (and of `select_related` with the paper's
u=30, l=0.01, t=10). Each size runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own. Synthetic log: users'
distinct-note counts are log-normal (median ~4, capped at 300, like the Stack Exchange dumps' 1-213),
notes are drawn with a Zipf-like popularity over events/20 notes, timestamps uniform over 30 days.
The score matrix is built with the default chunking (cooccurrence.DEFAULT_CHUNK_PAIRS).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synthetic_events(num_events: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    per_user = np.minimum(300, 1 + np.floor(np.exp(rng.normal(1.5, 1.0, size=num_events))).astype(np.int64))
    users = int(np.searchsorted(np.cumsum(per_user), num_events)) + 1
    user_id = np.repeat(np.arange(users), per_user[:users])[:num_events]
    num_notes = max(num_events // 20, 10)
    popularity = 1.0 / np.arange(1, num_notes + 1) ** 0.8
    note_id = rng.choice(num_notes, size=num_events, p=popularity / popularity.sum())
    timestamp = rng.integers(0, 30 * 86_400, size=num_events)
    return {"user_id": user_id, "note_id": note_id, "timestamp": timestamp}


def run_one(num_events: int, window_days: float) -> dict:
    from notellm_jax import runtime
    runtime.set_environment_defaults()
    from notellm_jax.data.cooccurrence import cooccurrence_scores, select_related

    events = synthetic_events(num_events)
    start, cpu_start = time.perf_counter(), time.process_time()
    scores = cooccurrence_scores(events, window_days * 86_400 if window_days > 0 else None)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    start = time.perf_counter()
    _, counts = select_related(scores, 30.0, 0.01, 10)
    select_seconds = time.perf_counter() - start
    return {"events": num_events, "users": scores.num_users, "notes": len(scores.note_ids),
            "score_seconds": round(seconds, 3), "events_per_second": round(num_events / seconds),
            # CPU time too: wall time on a shared 2-core machine includes waiting for other processes.
            "score_cpu_seconds": round(cpu_seconds, 3), "events_per_cpu_second": round(num_events / cpu_seconds),
            "select_related_seconds": round(select_seconds, 3), **counts,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--window-days", type=float, default=0.0)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child process: one size
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.window_days)))
        return
    runs = []
    for size in (int(s) for s in args.sizes.split(",")):
        out = subprocess.run([sys.executable, __file__, "--one", str(size), "--window-days", str(args.window_days)],
                             check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    print(json.dumps({"benchmark": "cooccurrence", "window_days": args.window_days, "machine": platform.processor()
                      or platform.machine(), "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
