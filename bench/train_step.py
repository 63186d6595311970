"""Train-step throughput of the default config: this project's JAX step vs the same model and losses in
PyTorch (transformers LlamaForCausalLM layers, torch CPU/GPU), the reference implementation's stack.

    python bench/train_step.py [--config configs/smollm2_se.py] [--steps 5] [--torch/--no-torch] [--set ...]
                               [--targets-per-note K] [--head-cost ROWS]

`--head-cost ROWS` times what the CSFT LM head costs instead (no head, every slot, packed to ROWS rows per
note; JAX only), e.g. at Gemma-3-270M's 262k-token vocabulary:
    python bench/train_step.py --config configs/smollm2_se.py:long --set model.checkpoint=random:gemma3_270m \
        --targets-per-note 3 --head-cost 5 --steps 3

Both sides run the step the config trains: the top `model.train_top_layers` decoder layers (all layers
when 0) on the cached output of the frozen bottom, the [EMB] projection, the in-batch InfoNCE, the LM head
at the supervised positions and the generation loss, backward, AdamW. Random weights of the config's
architecture (the same on both sides, so the first-step losses agree) and random batches of its shapes.
Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

from notellm_jax import runtime

runtime.set_environment_defaults()

import jax  # noqa: E402
import numpy as np  # noqa: E402


def step_batch(config, llama_cfg, frozen_layers: int, seed: int = 0, targets_per_note: int = 0) -> dict[str, np.ndarray]:
    """One synthetic batch of the config's shapes (with frozen layers: random hidden states as their output);
    `targets_per_note` > 0 supervises only that many of each note's max_targets slots (real batches: 3.1 of 16
    on the Stack Exchange data at r 0.2), 0 every slot."""
    from notellm_jax.data.input_pipeline import synthetic_batches
    batch = next(synthetic_batches(config, llama_cfg, seed))
    if targets_per_note:
        batch["target_mask"][:, targets_per_note:] = 0.0
    if frozen_layers:
        rng = np.random.default_rng(seed)
        n, t = batch["input_ids"].shape
        batch["hidden_in"] = rng.normal(0, 1, (n, t, llama_cfg.hidden_size)).astype(np.float32)
        del batch["input_ids"]
    return batch


def time_steps(step_fn, state, batch, steps: int) -> tuple[object, float, float, float]:
    """(state, first-step loss, compile + first step s, median step s) of `steps` timed calls."""
    start = time.time()
    state, metrics = step_fn(state, batch)
    first_loss = float(metrics["loss"])
    compile_s = time.time() - start
    times = []
    for _ in range(steps):
        start = time.time()
        state, metrics = step_fn(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.time() - start)
    return state, first_loss, compile_s, float(np.median(times))


def cpu_seconds_per_step(run_step, steps: int) -> float:
    """Median process CPU time (all threads) of one call: on a shared machine, the work a step costs
    independently of how long it waited for a core."""
    times = []
    for _ in range(steps):
        start = time.process_time()
        run_step()
        times.append(time.process_time() - start)
    return float(np.median(times))


def step_flops(config, llama_cfg, frozen_layers: int) -> float:
    """Model FLOPs of one step of `config` with its bottom read from the cache (the trainer's count)."""
    from notellm_jax.train.metrics import StepFlops
    return StepFlops(llama_cfg, config, frozen_layers)(0)


def throughput(config, flops: float, step_s: float) -> dict:
    from notellm_jax.train.metrics import peak_flops_per_device
    tokens = 2 * config.train.batch_pairs * config.prompt.max_length
    return {"step_s": step_s, "tokens_per_s": tokens / step_s, "model_tflop_per_step": flops / 1e12,
            "achieved_tflop_s": flops / step_s / 1e12,
            "mfu": flops / step_s / (peak_flops_per_device() * jax.device_count())}


def bench_jax(config, steps: int, targets_per_note: int = 0) -> tuple[dict, dict, object, int]:
    from notellm_jax import sharding as shd
    from notellm_jax.train.step import compile_steps, create_state, make_train_setup, to_global_batch
    from notellm_jax.weights.loading import load_initial_params
    params, llama_cfg = load_initial_params(config, emb_vocab_size=None)
    host_params = jax.tree.map(np.array, params)
    mesh = shd.mesh_from_config(config.mesh)
    spec = make_train_setup(config, llama_cfg, mesh, total_steps=1000)
    state = create_state(spec, params)
    step_fn, _ = compile_steps(spec)
    batch = to_global_batch(spec, step_batch(config, llama_cfg, spec.frozen_layers, targets_per_note=targets_per_note))
    state, first_loss, compile_s, step_s = time_steps(step_fn, state, batch, steps)
    box = [state]

    def one_step():
        box[0], metrics = step_fn(box[0], batch)
        jax.block_until_ready(metrics)

    result = {"framework": "jax", "version": jax.__version__, "device": jax.devices()[0].device_kind,
              "attention": config.model.attention, "compile_plus_first_step_s": compile_s,
              "step_cpu_s": cpu_seconds_per_step(one_step, steps),
              **throughput(config, step_flops(config, llama_cfg, spec.frozen_layers), step_s),
              "first_step_loss": first_loss}
    return result, host_params, llama_cfg, spec.frozen_layers


def _torch_state_dict(params: dict, llama_cfg, frozen_layers: int) -> dict:
    """The JAX model's weights for the trained top layers, named and numbered as a transformers LlamaModel."""
    import re

    import torch

    from notellm_jax.weights.hf import params_to_hf
    from notellm_jax.model.params import unstack_layers
    hf = params_to_hf(unstack_layers(params["decoder"]), llama_cfg)
    out = {}
    for name, value in hf.items():
        match = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        if match:
            if int(match.group(1)) >= frozen_layers:
                out[f"layers.{int(match.group(1)) - frozen_layers}.{match.group(2)}"] = torch.from_numpy(np.array(value))
        elif name.startswith("model."):
            out[name[len("model."):]] = torch.from_numpy(np.array(value))
    return out


def bench_torch(config, params: dict, llama_cfg, frozen_layers: int, steps: int, targets_per_note: int = 0) -> dict:
    import torch
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaModel

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if config.model.compute_dtype == "bfloat16" else torch.float32
    trained = llama_cfg.num_hidden_layers - frozen_layers
    hf_cfg = HFLlamaConfig(**{**llama_cfg.to_hf_dict(), "num_hidden_layers": trained, "torch_dtype": None})
    hf_cfg._attn_implementation = "sdpa"
    top = LlamaModel(hf_cfg)
    missing, unexpected = top.load_state_dict(_torch_state_dict(params, llama_cfg, frozen_layers), strict=False)
    if unexpected or [m for m in missing if "rotary" not in m]:
        raise RuntimeError(f"weight transfer to torch failed: missing {missing}, unexpected {unexpected}")
    top = top.to(device)
    embed = top.embed_tokens  # the (tied) head; frozen like the bottom when layers are frozen
    if frozen_layers:
        embed.weight.requires_grad_(False)
    proj = torch.nn.Linear(llama_cfg.hidden_size, config.model.emb_dim, bias=False)
    proj.weight.data = torch.from_numpy(np.array(params["proj"]["kernel"]).T.copy())
    proj = proj.to(device)
    tau = torch.nn.Parameter(torch.tensor(float(params["log_logit_scale"]), device=device))
    params = [p for p in list(top.parameters()) + list(proj.parameters()) + [tau] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.train.learning_rate, weight_decay=config.train.weight_decay)
    batch = {k: torch.as_tensor(v).to(device) for k, v in step_batch(config, llama_cfg, frozen_layers,
                                                                          targets_per_note=targets_per_note).items()}
    alpha = config.train.alpha

    def step():
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
            if frozen_layers:
                hidden = top(inputs_embeds=batch["hidden_in"], attention_mask=batch["attention_mask"]).last_hidden_state
            else:
                hidden = top(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            rows = torch.arange(hidden.shape[0], device=device)
            z = torch.nn.functional.normalize(proj(hidden[rows, batch["embed_read_pos"]].float()), dim=-1)
            sim = (z @ z.T) * tau.exp()
            sim = sim.masked_fill(torch.eye(len(z), dtype=torch.bool, device=device), float("-inf"))
            pid = batch["pair_id"]
            positive = (pid[:, None] == pid[None, :]) & ~torch.eye(len(z), dtype=torch.bool, device=device)
            l_cl = (torch.logsumexp(sim, -1) - sim[positive].view(len(z))).mean()
            gathered = hidden[rows[:, None], batch["target_positions"]]
            logits = (gathered @ embed.weight.T).float()
            nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["target_ids"].long().flatten(),
                                                    reduction="none")
            mask = batch["target_mask"].flatten()
            l_gen = (nll * mask).sum() / mask.sum()
            loss = (l_cl + alpha * l_gen) / (1 + alpha)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.train.grad_clip)
        opt.step()
        return loss

    start = time.time()
    first_loss = float(step().detach())
    first = time.time() - start
    times = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.time()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.time() - start)
    cpu_s = cpu_seconds_per_step(step, steps) if device == "cpu" else None
    if device == "cuda":
        torch.cuda.empty_cache()  # hand the memory back for the JAX programs that follow (accelerator suite)
    return {"framework": "torch", "version": torch.__version__, "device": device, "threads": torch.get_num_threads(),
            "first_step_s": first, "step_cpu_s": cpu_s, **throughput(config, step_flops(config, llama_cfg, frozen_layers),
                                                float(np.median(times))),
            "first_step_loss": first_loss}


def benchmark_config(spec: str, overrides=()):
    """The config with synthetic batches and random weights of its checkpoint's architecture (speed does
    not depend on the weights)."""
    from notellm_jax.config import load_config, override
    config = load_config(spec, overrides)
    checkpoint = config.model.checkpoint
    if not checkpoint.startswith("random:"):
        from notellm_jax.weights.formats import load_params
        from notellm_jax.model.families import PRESETS
        _, cfg = load_params(config.resolve(checkpoint))
        match = [k for k, v in PRESETS.items() if all(getattr(cfg, f) == x for f, x in v.items())]
        if not match:
            raise SystemExit(f"no preset matches {checkpoint}; pass --set model.checkpoint=random:<preset>")
        checkpoint = f"random:{match[0]}"
    return override(config, {"model.checkpoint": checkpoint, "train.synthetic_data": True})


def compare(config, steps: int, with_torch: bool = True, targets_per_note: int = 0) -> dict:
    """JAX's step and (optionally) PyTorch's on the same weights and batch."""
    result = {"batch_notes": 2 * config.train.batch_pairs, "seq_len": config.prompt.max_length,
              "train_top_layers": config.model.train_top_layers, "compute_dtype": config.model.compute_dtype,
              "objective": config.train.objective, "targets_per_note": targets_per_note or config.prompt.max_targets,
              "head_rows_per_note": config.train.head_rows_per_note}
    jax_result, params, llama_cfg, frozen = bench_jax(config, steps, targets_per_note)
    result["jax"] = jax_result
    if with_torch:
        # Same weights and batch on both sides, so the first-step losses must agree (a correctness check).
        result["torch"] = bench_torch(config, params, llama_cfg, frozen, steps, targets_per_note)
        result["jax_speedup_vs_torch"] = result["torch"]["step_s"] / result["jax"]["step_s"]
        if result["torch"]["step_cpu_s"]:
            result["jax_speedup_vs_torch_cpu_time"] = result["torch"]["step_cpu_s"] / result["jax"]["step_cpu_s"]
    return result


def head_cost(config, steps: int, targets_per_note: int, packed_rows: int) -> dict:
    """What the CSFT LM head costs per step, side by side in one process: the same step without the head
    (`train.objective=gcl_only`), with the head at every target slot (`train.head_rows_per_note=0`) and
    packed to `packed_rows` rows per note. JAX only (the torch side is a LlamaModel)."""
    from notellm_jax.config import override
    variants = {"no_head": {"train.objective": "gcl_only", "train.head_rows_per_note": 0},
                "head_all_slots": {"train.objective": "notellm", "train.head_rows_per_note": 0},
                "head_packed": {"train.objective": "notellm", "train.head_rows_per_note": packed_rows}}
    result = {}
    for name, changes in variants.items():
        print(f"[train_step] {name} ...", file=sys.stderr, flush=True)
        result[name] = compare(override(config, changes), steps, False, targets_per_note)
    for key in ("step_s", "step_cpu_s"):  # process CPU time: what the head costs even on a shared machine
        base = result["no_head"]["jax"][key]
        result[f"head_{key}_all_slots"] = result["head_all_slots"]["jax"][key] - base
        result[f"head_{key}_packed"] = result["head_packed"]["jax"][key] - base
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/smollm2_se.py")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--targets-per-note", type=int, default=0,
                        help="supervise this many of each note's max_targets slots (0: all, the synthetic default)")
    parser.add_argument("--head-cost", type=int, default=0, metavar="ROWS",
                        help="measure the LM head instead: no head vs every slot vs packed to ROWS rows per note")
    args = parser.parse_args()
    config = benchmark_config(args.config, args.overrides)
    result = {"benchmark": "train_step", "config": args.config, "overrides": args.overrides,
              "machine": platform.node(), "cpu_model": runtime.cpu_model(),
              "cpu_count": os.cpu_count(), "load_average_1m": os.getloadavg()[0],
              **(head_cost(config, args.steps, args.targets_per_note, args.head_cost) if args.head_cost else
                 compare(config, args.steps, args.torch, args.targets_per_note))}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
