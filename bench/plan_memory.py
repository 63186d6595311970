"""Planning table for the NoteLLM step of a 7-8B model: per-device memory from ahead-of-time compilation
with abstract parameters, for the slices users train on, under each remat policy. Prints one JSON document.

    python bench/plan_memory.py [--configs configs/paper_7b.py:llama2_7b,aot configs/paper_7b.py:qwen3_8b,aot]
                                [--policies full,dots_with_no_batch_dims_saveable] [--targets 8xH100-80GB,...]

Each (config, target, policy) runs `python -m notellm_jax plan` in a subprocess with that many fake CPU
devices; every finished row is also printed to stderr at once (`[plan] row {...}`), so a run cut short
keeps what it computed. Memory is XLA's CPU buffer assignment for the sharded program (bf16 compute, fp32
params + AdamW state): a planning estimate; CPU has no native bf16 matmul, so activation figures lean high.
"""
import argparse
import json
import subprocess
import sys

# (name, chips, HBM GiB per chip, mesh data x fsdp x tensor)
TARGETS = [
    ("v5p-8", 4, 95, (1, 4, 1)),
    ("v4-32", 16, 32, (1, 16, 1)),
    ("8xH100-80GB", 8, 80, (1, 8, 1)),
    ("16xH100-80GB", 16, 80, (2, 8, 1)),
]


def plan_row(config: str, target: tuple, policy: str) -> dict:
    name, chips, hbm, (data, fsdp, tensor) = target
    cmd = [sys.executable, "-m", "notellm_jax", "plan", "--config", config, "--devices", str(chips),
           "--set", f"mesh.data={data}", "--set", f"mesh.fsdp={fsdp}", "--set", f"mesh.tensor={tensor}",
           "--set", f"model.remat_policy={policy}"]
    print(f"[plan] {config} {name} {policy} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(target=name, hbm_gib=hbm, fits=result["per_device_gib"] <= 0.9 * hbm)
    print(f"[plan] row {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["configs/paper_7b.py:llama2_7b,aot"],
                        help="config specs, space-separated (a spec's own arguments are comma-separated)")
    parser.add_argument("--policies", default="full,dots_with_no_batch_dims_saveable")
    parser.add_argument("--targets", default=",".join(t[0] for t in TARGETS))
    args = parser.parse_args()
    chosen = args.targets.split(",")
    targets = sorted((t for t in TARGETS if t[0] in chosen), key=lambda t: chosen.index(t[0]))
    rows = [plan_row(config, target, policy) for target in targets for policy in args.policies.split(",")
            for config in args.configs]
    print(json.dumps({"benchmark": "plan_memory", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
