"""Ahead-of-time planning: compile the NoteLLM train step for a mesh with abstract (unallocated) state
and report XLA's per-device memory and the model FLOPs per step.

    notellm plan --config configs/paper_7b.py:llama2_7b,aot --devices 8 [--set mesh.fsdp=...]

`--devices N` fakes N CPU devices. That must happen before jax is imported, so `main` calls this module's
`before_jax(args)` first, and this module imports jax and the planning code only inside its functions.
The figures are the CPU backend's buffer assignment for the sharded program: a planning estimate of what
each accelerator holds, not a measurement on one.
"""
from __future__ import annotations

import argparse
import json
import time

from notellm_jax import runtime


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--devices", type=int, default=0, help="fake this many CPU devices")


def before_jax(args: argparse.Namespace) -> None:
    """`--devices N`: N fake CPU devices, before anything imports jax."""
    runtime.fake_devices(args.devices)


def abstract_batch(config, setup) -> dict:
    """ShapeDtypeStructs of one global batch with its sharding (what the pipeline would deliver: the
    `model.batch` spec's pipeline keys)."""
    from notellm_jax import sharding as shd  # imports jax: only after before_jax (--devices fakes CPU devices)
    from notellm_jax.model.batch import BatchDims  # as above
    from notellm_jax.model.batch import abstract_batch as spec_batch  # as above

    dims = BatchDims(2 * config.train.batch_pairs, config.prompt.max_length, config.prompt.max_targets)
    return spec_batch(dims, sharding_of=lambda ndim: shd.batch_sharding(setup.mesh, ndim))


def plan(config, num_layers: int | None = None) -> dict:
    """Compile the train step for `config` on the current devices; nothing of the model is allocated.

    `num_layers` truncates the decoder (same widths): per-layer memory and the shipped remat policy at a
    fraction of the full model's compile time."""
    import jax  # jax only after before_jax (--devices fakes CPU devices)

    from notellm_jax import sharding as shd  # imports jax: as above
    from notellm_jax.model.families import preset  # as above
    from notellm_jax.train.metrics import StepFlops  # as above
    from notellm_jax.train.step import compile_steps, make_train_setup  # as above
    from notellm_jax.weights.loading import runtime_llama_config  # as above

    name = config.model.checkpoint.split(":", 1)[1] if config.model.checkpoint.startswith("random:") else None
    if name is None:
        raise ValueError("planning needs model.checkpoint='random:<preset>' (shapes only, no weights)")
    llama_cfg = runtime_llama_config(config, preset(name))
    llama_cfg = llama_cfg.replace(vocab_size=llama_cfg.vocab_size + 1,  # [EMB]
                                  num_hidden_layers=num_layers or llama_cfg.num_hidden_layers)
    mesh = shd.mesh_from_config(config.mesh)
    setup = make_train_setup(config, llama_cfg, mesh, total_steps=1000)
    step_fn, _ = compile_steps(setup)
    start = time.time()
    compiled = step_fn.lower(setup.abstract_state, abstract_batch(config, setup)).compile()
    compile_s = time.time() - start
    mem = compiled.memory_analysis()
    gib = 1024 ** 3
    out = {"model": name, "params_b": llama_cfg.num_params() / 1e9, "devices": jax.device_count(),
           "mesh": dict(mesh.shape), "remat_policy": llama_cfg.remat_policy, "compute_dtype": llama_cfg.compute_dtype,
           "batch_pairs": config.train.batch_pairs, "seq_len": config.prompt.max_length, "compile_s": round(compile_s, 1)}
    if mem is not None:
        out.update(argument_gib=mem.argument_size_in_bytes / gib, output_gib=mem.output_size_in_bytes / gib,
                   temp_gib=mem.temp_size_in_bytes / gib, alias_gib=mem.alias_size_in_bytes / gib,
                   generated_code_gib=mem.generated_code_size_in_bytes / gib)
        # Donated state aliases its output, so live memory = arguments + temporaries (+ unaliased outputs).
        out["per_device_gib"] = (mem.argument_size_in_bytes + mem.temp_size_in_bytes +
                                 mem.output_size_in_bytes - mem.alias_size_in_bytes) / gib
    out["model_tflops_per_step"] = StepFlops(llama_cfg, config, frozen_layers=0)(0) / 1e12
    return out


def run(args, config) -> dict:
    """`notellm plan`: compile the step ahead of time and print the memory and FLOP figures as JSON."""
    result = plan(config)
    print(json.dumps(result))
    return result
