"""Peak host memory of loading a Hugging Face LLaMA onto an 8-device fsdp mesh (8 fake CPU devices).

    python bench/load_memory.py [--folder DIR] [--layers 24] [--hidden 1024] [--files 6] [--scan/--no-scan]

Writes (once, into DIR) a random LLaMA as an HF folder of several safetensors files straight from numpy,
then loads it in a FRESH process with the trainer's loading path (`load_initial_params` onto the
(1, 8, 1) mesh, the [EMB] row added) and prints JSON: the growth of the RSS high-water mark while loading
(`ru_maxrss` after minus the RSS before) against the fp32 bytes of the model. On CPU the "devices" are
host memory, so the placed parameters themselves are 1.0x of that; anything above is the loader's
transient (reading, transposing, stacking, copies).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from notellm_jax.runtime import cpu_model

REPO = Path(__file__).resolve().parents[1]


def hf_config(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int) -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
            "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False,
            "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}


def _hf_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    x, m, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = x // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (v, x)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (x,), p + "self_attn.q_proj.weight": (x, x),
                       p + "self_attn.k_proj.weight": (kv, x), p + "self_attn.v_proj.weight": (kv, x),
                       p + "self_attn.o_proj.weight": (x, x), p + "post_attention_layernorm.weight": (x,),
                       p + "mlp.gate_proj.weight": (m, x), p + "mlp.up_proj.weight": (m, x),
                       p + "mlp.down_proj.weight": (x, m)})
    shapes["model.norm.weight"] = (x,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, x)
    return shapes


def write_random_hf(folder: Path, cfg: dict, files: int, seed: int = 0, dtype=np.float32) -> int:
    """A random LLaMA as config.json + `files` safetensors files + model.safetensors.index.json (HF's
    sharded layout), one tensor in memory at a time. Returns the number of parameters."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    shapes = _hf_shapes(cfg)
    total = sum(int(np.prod(s)) for s in shapes.values())
    rng = np.random.default_rng(seed)
    weight_map, names, budget = {}, list(shapes), total / files
    index, start = 0, 0
    while start < len(names):
        stop, count = start, 0
        while stop < len(names) and (count < budget or stop == start):
            count += int(np.prod(shapes[names[stop]]))
            stop += 1
        file = f"model-{index + 1:05d}-of-{files:05d}.safetensors"
        tensors = {}
        for name in names[start:stop]:
            scale = 1.0 if name.endswith("norm.weight") else 0.02
            tensors[name] = (scale * rng.standard_normal(shapes[name], np.float32)
                             + (1.0 if name.endswith("norm.weight") else 0.0)).astype(dtype)
            weight_map[name] = file
        save_file(tensors, folder / file, metadata={"format": "pt"})
        del tensors
        index, start = index + 1, stop
    if index != files:  # rename to the real count so the names stay HF's "-of-N" convention
        for old in sorted(set(weight_map.values())):
            new = old.replace(f"-of-{files:05d}", f"-of-{index:05d}")
            (folder / old).rename(folder / new)
            weight_map = {k: (new if v == old else v) for k, v in weight_map.items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total * np.dtype(dtype).itemsize}, "weight_map": weight_map}, indent=1))
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    return total


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(folder: Path, scan: bool) -> dict:
    """In this (fresh) process: load `folder` through the trainer onto fsdp=8; RSS growth while loading."""
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    from notellm_jax.config import Config, override
    from notellm_jax.sharding import make_mesh
    from notellm_jax.weights.loading import load_initial_params

    cfg = json.loads((folder / "config.json").read_text())
    config = override(Config(name="load_memory"), {"model.checkpoint": str(folder), "model.scan_layers": scan,
                                                    "mesh.fsdp": 8})
    mesh = make_mesh(1, 8, 1)
    jax.block_until_ready(jax.device_put(np.zeros(8, np.float32)))  # runtime up before the baseline
    before = _rss_bytes()
    start = time.time()
    params, llama_cfg = load_initial_params(config, cfg["vocab_size"] + 1, mesh)
    jax.block_until_ready(params)
    seconds = time.time() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return {"params": n_params, "fp32_bytes": 4 * n_params, "rss_before": before, "rss_peak": peak,
            "growth_over_fp32": (peak - before) / (4 * n_params), "load_s": round(seconds, 1),
            "scan_layers": scan, "vocab_size": llama_cfg.vocab_size,
            "embedding_shape": list(params["decoder"]["embed_tokens"]["embedding"].shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/notellm_load_memory"))
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--files", type=int, default=6)
    parser.add_argument("--scan", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_only:
        print(json.dumps(measure(args.folder, args.scan)))
        return
    if not (args.folder / "config.json").is_file():
        cfg = hf_config(args.layers, args.hidden, args.intermediate, args.hidden // 64, args.hidden // 64, args.vocab)
        write_random_hf(args.folder, cfg, args.files)
    # A fresh interpreter: the high-water mark must not include this process's writing.
    out = subprocess.run([sys.executable, __file__, "--folder", str(args.folder), "--measure-only",
                          "--scan" if args.scan else "--no-scan"], check=True, capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update(machine=cpu_model(), cpus=os.cpu_count(), load_average_1min=round(os.getloadavg()[0], 2),
                  files=len(list(args.folder.glob("*.safetensors"))))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
