"""Co-occurrence throughput, in-memory engine and Beam local runner, on synthetic logs; prints JSON.

    python bench/cooccurrence.py [--sizes 1000000,10000000,30000000] [--engines memory,beam] [--beam-sizes S]
        [--max-rss-gib 0] [--timeout-s 900] [--beam-timeout-s 0] [--out bench/results/cooccurrence/DATE-cpu.json]

The committed result: --sizes 1000000,10000000,30000000,60000000 --beam-sizes 1000000,10000000,30000000
--max-rss-gib 12 --timeout-s 900 --beam-timeout-s 600.

Each (engine, size) runs in a fresh subprocess on a log from notellm_jax.data.synthetic (default
SyntheticLog parameters: Pareto user activity, Zipf note popularity, time-ordered sessions), written to
a temporary events.parquet first (not timed). Timed: reading events.parquet, the scores, and the
selection with the paper's u=30, l=0.01, t=10 -- for "memory" cooccurrence.related_pairs, for "beam"
beam_prepare.related_pairs on the DirectRunner with 2 worker processes (multi_processing). Peak memory
is the largest sum of RSS over the subprocess and all its descendants (Beam's workers), sampled every
0.2 s. Where each engine stops fitting this machine: a run whose process tree exceeds --max-rss-gib
(default 85% of the memory available when it starts), or whose timed part exceeds its time limit, is
killed and recorded as "did_not_fit" with the memory and time it had reached. Each run records the
machine's load average at its start (the machine is shared: wall time depends on it).
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


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in _tree(proc):
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def _kill_tree(proc: psutil.Process) -> None:
    for p in reversed(_tree(proc)):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


class _Watch:
    """Samples the child's tree RSS every 0.2 s from its READY line on; kills the tree past the caps."""

    def __init__(self, child: subprocess.Popen, max_rss: float, timeout_s: float):
        self.proc, self.max_rss, self.timeout_s = psutil.Process(child.pid), max_rss, timeout_s
        self.peak, self.ready_at, self.stopped = 0, None, None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set() and self.stopped is None:
            if self.ready_at is not None:
                rss = _tree_rss(self.proc)
                self.peak = max(self.peak, rss)
                elapsed = time.perf_counter() - self.ready_at
                if rss > self.max_rss:
                    self.stopped = (f"stopped at {rss / 2**30:.1f} GiB (cap {self.max_rss / 2**30:.1f}) "
                                    f"after {elapsed:.0f} s")
                elif elapsed > self.timeout_s:
                    self.stopped = f"timed out after {elapsed:.0f} s (at {rss / 2**30:.1f} GiB)"
                if self.stopped:
                    _kill_tree(self.proc)
            time.sleep(0.2)


def measure(engine: str, size: int, max_rss_gib: float, timeout_s: float) -> dict:
    """Run one size in a subprocess; its JSON plus peak tree RSS (from the READY line on), or how it stopped."""
    cap = max_rss_gib * 2**30 if max_rss_gib > 0 else 0.85 * psutil.virtual_memory().available
    base = {"engine": engine, "events": size, "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    child = subprocess.Popen([sys.executable, __file__, "--one", f"{engine}:{size}"], stdout=subprocess.PIPE,
                             text=True, cwd=ROOT)
    watch = _Watch(child, cap, timeout_s)
    lines = []
    for line in child.stdout:
        if line.startswith("READY"):
            watch.ready_at = time.perf_counter()
        lines.append(line)
    child.wait()
    watch.stop.set()
    watch.thread.join()
    peak = {"peak_rss_gib": round(watch.peak / 2**30, 2)}
    if watch.stopped:
        return {**base, "did_not_fit": watch.stopped, **peak}
    if child.returncode:
        return {**base, "failed": f"exit code {child.returncode}", **peak}
    return {**base, **json.loads(lines[-1]), **peak}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000000,10000000,30000000")
    parser.add_argument("--engines", default="memory,beam")
    parser.add_argument("--beam-sizes", default="", help="the Beam runs' sizes (default --sizes)")
    parser.add_argument("--max-rss-gib", type=float, default=0.0, help="kill a run whose process tree exceeds "
                        "this (0 = 85%% of the memory available at its start)")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="kill a run timed longer than this")
    parser.add_argument("--beam-timeout-s", type=float, default=0.0, help="the Beam runs' limit (0 = --timeout-s)")
    parser.add_argument("--out", default="")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process: engine:size
    args = parser.parse_args()
    if args.one:
        engine, size = args.one.split(":")
        print(json.dumps(run_one(engine, int(size))))
        return
    runs = []
    for engine in args.engines.split(","):
        limit = args.beam_timeout_s if engine == "beam" and args.beam_timeout_s > 0 else args.timeout_s
        sizes = args.beam_sizes if engine == "beam" and args.beam_sizes else args.sizes
        for size in (int(s) for s in sizes.split(",")):
            runs.append(measure(engine, size, args.max_rss_gib, limit))
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    result = {"benchmark": "cooccurrence", "machine": f"{platform.machine()} {os.cpu_count()} cores, "
              f"{psutil.virtual_memory().total / 2**30:.0f} GiB (shared with other jobs)",
              "load_average_at_end": [round(x, 2) for x in os.getloadavg()], "runs": runs}
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
