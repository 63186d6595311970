"""7-8B NoteLLM steps compiled by the TPU compiler (libtpu) for real TPU topologies from this CPU host: per-device
memory against HBM, collectives per step and a roofline MFU for each row. Prints one JSON document.

    python bench/plan_tpu.py [--rows v5p8-192,v5p8-512,...] [--out FILE.json]

Each row runs `python -m notellm_jax plan --target tpu` in a subprocess (a fresh compiler each, niced); every
finished row is printed to stderr at once (`[plan_tpu] row {...}`) and appended to `--out` as the document
so far, so a run cut short keeps what it computed. ROWS lists the matrix, most important first.
"""
import argparse
import json
import subprocess
import sys
import time

L2 = "configs/paper_7b.py:llama2_7b,aot"
# name: (config, topology, num_slices, --set overrides)
ROWS = {
    "v5p8-192": (L2, "v5p-8", 1, {}),
    "v5p8-512": (L2, "v5p-8", 1, {"prompt.max_length": 512}),
    "v5p8-192-remat-full": (L2, "v5p-8", 1, {"model.remat_policy": "full"}),
    "2xv5p8-192-dcn": (L2, "v5p-8", 2, {"mesh.data": 2}),
    "v6e8-192": (L2, "v6e-8", 1, {}),
    "v4-32-192": (L2, "v4-32", 1, {}),
    "v5p32-192": (L2, "v5p-32", 1, {}),
    "llama3_8b-v5p8-192": ("configs/paper_7b.py:llama3_8b,aot", "v5p-8", 1, {}),
    "qwen3_8b-v5p8-192": ("configs/paper_7b.py:qwen3_8b,aot", "v5p-8", 1, {}),
    "v5p8-192-fsdp2-tensor2": (L2, "v5p-8", 1, {"mesh.fsdp": 2, "mesh.tensor": 2}),
    "v5p8-192-b256": (L2, "v5p-8", 1, {"train.batch_pairs": 256}),
    "v5p8-512-remat-full": (L2, "v5p-8", 1, {"prompt.max_length": 512, "model.remat_policy": "full"}),
    "v6e8-192-remat-full": (L2, "v6e-8", 1, {"model.remat_policy": "full"}),
    "v5p8-192-b512": (L2, "v5p-8", 1, {"train.batch_pairs": 512}),
}


def plan_row(name: str) -> dict:
    config, topology, slices, sets = ROWS[name]
    cmd = ["nice", "-n", "10", sys.executable, "-m", "notellm_jax", "plan", "--config", config, "--target", "tpu",
           "--topology", topology, "--num-slices", str(slices)]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    print(f"[plan_tpu] {name}: {' '.join(cmd[3:])} ...", file=sys.stderr, flush=True)
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        return {"row": name, "error": proc.stderr.strip().splitlines()[-1][:2000], "wall_s": time.time() - start}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"row": name, "overrides": sets, "wall_s": round(time.time() - start, 1), **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated names of ROWS, in order")
    parser.add_argument("--out", help="also write the document here after every row")
    args = parser.parse_args()
    rows = []
    for name in args.rows.split(","):
        rows.append(plan_row(name))
        short = {k: v for k, v in rows[-1].items() if k != "collectives"}
        print(f"[plan_tpu] row {json.dumps(short)}", file=sys.stderr, flush=True)
        document = json.dumps({"benchmark": "plan_tpu", "machine": "cpu2-epyc (2 shared cores)", "rows": rows},
                              indent=1)
        if args.out:
            with open(args.out, "w") as f:
                f.write(document + "\n")
    print(document)


if __name__ == "__main__":
    main()
