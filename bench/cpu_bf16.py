"""bfloat16 against float32 on XLA's CPU backend, under each XLA_FLAGS setting that might make bfloat16 pay.

    python bench/cpu_bf16.py [--rows 1024] [--rounds 3] [--out bench/results/cpu_bf16/DATE-MACHINE-TAG.json]

One SmolLM2-135M MLP block ([rows, 576] x [576, 1536], SiLU, x [1536, 576]), jitted, in float32; in bfloat16
with float32 accumulation (what the model's bfloat16 compute does); and in bfloat16 throughout. Each flag
setting runs in its own process (XLA reads XLA_FLAGS once), the settings interleaved for `--rounds` rounds;
the best of 5 calls per round, the best round kept. The CPU's bfloat16 features (/proc/cpuinfo: avx512_bf16,
amx_bf16) are recorded: without them bfloat16 matmuls are converted or emulated.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

FLAG_SETS = ("", "--xla_cpu_use_xnnpack=true", "--xla_cpu_use_onednn=true", "--xla_cpu_enable_fast_math=true",
             "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY")


def measure(rows: int) -> dict:
    """{path: best ms} of the block in this process."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = (rng.normal(size=(rows, 576)), rng.normal(size=(576, 1536)) * 0.04, rng.normal(size=(1536, 576)) * 0.02)
    out = {}
    for name, dtype, acc in (("float32", jnp.float32, jnp.float32), ("bfloat16_acc_float32", jnp.bfloat16, jnp.float32),
                             ("bfloat16", jnp.bfloat16, jnp.bfloat16)):
        x, w1, w2 = (jnp.asarray(a, dtype) for a in arrays)
        fn = jax.jit(lambda x, w1, w2, acc=acc: jnp.dot(jax.nn.silu(jnp.dot(x, w1, preferred_element_type=acc))
                                                        .astype(x.dtype), w2, preferred_element_type=acc))
        fn(x, w1, w2).block_until_ready()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn(x, w1, w2).block_until_ready()
            times.append(time.perf_counter() - start)
        out[name] = round(min(times) * 1e3, 2)
    return out


def cpu_features() -> list[str]:
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    return sorted(f for f in flags if "bf16" in f or f.startswith(("amx", "avx512f", "avx2")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.rows)))
        return
    best: dict[str, dict[str, float]] = {}
    for _ in range(args.rounds):
        for flags in FLAG_SETS:
            env = {**os.environ, "XLA_FLAGS": flags}
            run = subprocess.run([sys.executable, __file__, "--child", "--rows", str(args.rows)], env=env,
                                 capture_output=True, text=True, check=True)
            for path, ms in json.loads(run.stdout.strip().splitlines()[-1]).items():
                best.setdefault(flags or "(none)", {})[path] = min(ms, best.get(flags or "(none)", {}).get(path, ms))
            print(flags or "(none)", best[flags or "(none)"], file=sys.stderr, flush=True)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    result = {"benchmark": "cpu_bf16", "rows": args.rows, "rounds": args.rounds, "cpu_features": cpu_features(),
              "cpus": os.cpu_count(), "load_after": load, "best_ms": best}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
