"""7-8B NoteLLM steps compiled by the TPU compiler (libtpu) for real TPU topologies from this CPU host: per-device
memory against HBM, collectives per step and a roofline MFU for each row. Prints one JSON document.

    python bench/plan_tpu.py [--rows v5p8-192,v5p8-512,...] [--out FILE.json]
    python bench/plan_tpu.py --splash [--out FILE.json]
    python bench/plan_tpu.py --table FILE.json   # the markdown table of docs/scaling.md from a finished run

`--splash` instead compiles splash attention alone (forward and backward, under shard_map) at the 7-8B
models' attention shapes for the paper's batch, and reports whether it lowered through Mosaic.

Each row runs `python -m notellm_jax plan --target tpu` in a subprocess (a fresh compiler each, niced); every
finished row is printed to stderr at once (`[plan_tpu] row {...}`) and appended to `--out` as the document
so far, so a run cut short keeps what it computed. ROWS lists the matrix, most important first.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

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
    "v5p8-192-b256-remat-full": (L2, "v5p-8", 1, {"train.batch_pairs": 256, "model.remat_policy": "full"}),
    "2xv5p8-192-dcn-b128": (L2, "v5p-8", 2, {"mesh.data": 2, "train.batch_pairs": 128}),
    "v5p8-192-b512": (L2, "v5p-8", 1, {"train.batch_pairs": 512}),
    "v5p8-512-splash": (L2, "v5p-8", 1, {"prompt.max_length": 512, "model.attention": "splash"}),
}


# (topology, length, model, query heads, KV heads, sliding window) at head_dim 128: both lengths on v5p-8, MHA
# (LLaMA-2) and GQA 32/8 (LLaMA-3, Qwen3, Mistral), a sliding window through splash's LocalMask, one v6e row.
SPLASH = [("v5p-8", 192, "llama2_7b", 32, 32, None), ("v5p-8", 192, "llama3_8b/qwen3_8b", 32, 8, None),
          ("v5p-8", 512, "llama2_7b", 32, 32, None), ("v5p-8", 512, "llama3_8b/qwen3_8b", 32, 8, None),
          ("v5p-8", 512, "mistral-style window 128 (LocalMask)", 32, 8, 128),
          ("v6e-8", 512, "llama3_8b/qwen3_8b", 32, 8, None)]


def splash_rows(out: str | None) -> list[dict]:
    """Each SPLASH row compiled in this process (seconds to a minute each), printed and saved as it finishes."""
    from notellm_jax import runtime  # before jax: JAX_PLATFORMS pinned where no TPU is present

    runtime.set_environment_defaults()
    from notellm_jax.config import MeshConfig  # imports jax: after the environment defaults
    from notellm_jax.tools import tpu_plan  # as above

    rows = []
    for topology, length, model, heads, kv_heads, window in SPLASH:
        rows.append({"model": model, **tpu_plan.splash_lowering(topology, MeshConfig(), 128, length, heads,
                                                                 kv_heads, window=window)})
        print(f"[plan_tpu] splash {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
        if out:
            Path(out).write_text(json.dumps({"benchmark": "plan_tpu_splash", "libtpu": tpu_plan.libtpu_version(),
                                             "rows": rows}, indent=1) + "\n")
    return rows


def plan_row(name: str, hlo_dir: str | None = None) -> dict:
    config, topology, slices, sets = ROWS[name]
    cmd = ["nice", "-n", "10", sys.executable, "-m", "notellm_jax", "plan", "--config", config, "--target", "tpu",
           "--topology", topology, "--num-slices", str(slices)]
    if hlo_dir:
        cmd += ["--hlo-out", f"{hlo_dir}/{name}.hlo.gz"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    print(f"[plan_tpu] {name}: {' '.join(cmd[3:])} ...", file=sys.stderr, flush=True)
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        return {"row": name, "error": proc.stderr.strip().splitlines()[-1][:2000], "wall_s": time.time() - start}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"row": name, "overrides": sets, "wall_s": round(time.time() - start, 1), **result}


def cpu_estimates() -> dict:
    """(model, slice, remat policy) -> the CPU backend's per-device GiB, from bench/results/plan_memory (paper's
    batch and 192 tokens; those runs had no other shapes)."""
    found = {}
    for path in sorted(Path(__file__).parent.joinpath("results", "plan_memory").glob("*.json")):
        for row in json.loads(path.read_text())["rows"]:
            found[(row["model"], row["target"], row["remat_policy"])] = row["per_device_gib"]
    return found


def table(path: str) -> str:
    """The markdown table of docs/scaling.md from a plan_tpu JSON document."""
    cpu = cpu_estimates()
    lines = ["| row | slice | model | mesh (d×f×t) | remat | batch × seq | TPU compiler GiB / HBM | CPU-backend GiB | "
             "collective GiB sent | bound | MFU bound (no overlap) |", "|" + "---|" * 11]
    for row in json.loads(Path(path).read_text())["rows"]:
        if "error" in row:
            lines.append(f"| {row['row']} | failed: {row['error'][:80]} |" + " |" * 9)
            continue
        where = f"{row['num_slices']} × {row['topology']}" if row["num_slices"] > 1 else row["topology"]
        mesh = " × ".join(str(row["mesh"][a]) for a in ("data", "fsdp", "tensor"))
        sized = f"{2 * row['batch_pairs']} × {row['seq_len']}"
        estimate = cpu.get((row["model"], row["topology"], row["remat_policy"])) if row["seq_len"] == 192 and \
            row["batch_pairs"] == 64 and row["num_slices"] == 1 and row["mesh"]["tensor"] == 1 else None
        if "per_device_gib" not in row:
            lines.append(f"| {row['row']} | {where} | {row['model']} | {mesh} | {row['remat_policy']} | {sized} | "
                         f"does not fit (compiler) | {estimate or '-'} | - | - | - |")
            continue
        fits = "fits" if row["fits"] else "**does not fit**"
        roof = row["roofline"]
        lines.append(f"| {row['row']} | {where} | {row['model']} | {mesh} | {row['remat_policy']} | {sized} | "
                     f"{row['per_device_gib']:.1f} / {row['hbm_gib']} ({fits}) | "
                     f"{f'{estimate:.1f}' if estimate else '-'} | {row['collective_wire_bytes'] / 1024 ** 3:.1f} | "
                     f"{roof['bound_by']} | {100 * roof['mfu']:.0f}% ({100 * roof['mfu_no_overlap']:.0f}%) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated names of ROWS, in order")
    parser.add_argument("--out", help="also write the document here after every row")
    parser.add_argument("--hlo-dir", help="keep each row's compiled HLO here (NAME.hlo.gz)")
    parser.add_argument("--splash", action="store_true", help="splash attention lowering rows instead")
    parser.add_argument("--table", help="print the markdown table of a finished run's JSON and stop")
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return
    if args.splash:
        print(json.dumps({"benchmark": "plan_tpu_splash", "rows": splash_rows(args.out)}, indent=1))
        return
    rows = []
    for name in args.rows.split(","):
        rows.append(plan_row(name, args.hlo_dir))
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
