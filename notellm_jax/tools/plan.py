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
import math
import sys
import time

from notellm_jax import runtime


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--devices", type=int, default=0, help="fake this many CPU devices")
    parser.add_argument("--target", choices=("cpu", "tpu"), default="cpu",
                        help="cpu: the CPU backend's estimate on fake devices; tpu: the TPU compiler (libtpu) "
                             "for --topology, from this host")
    parser.add_argument("--topology", default="v5p-8", help="TPU slice (v5p-8, v4-32, v6e-8, ...) or GEN:AxBxC")
    parser.add_argument("--num-slices", type=int, default=1, help="slices joined over DCN (mesh.data spans them)")
    parser.add_argument("--hlo-out", help="--target tpu: also write the compiled HLO text here (gzip if .gz)")


def before_jax(args: argparse.Namespace) -> None:
    """`--devices N`: N fake CPU devices, before anything imports jax. `--target tpu` fakes as many CPU devices
    as the slices have chips, so the config's mesh is checked against the target's device count; without
    libtpu it falls back to the CPU backend's estimate on those devices."""
    from notellm_jax.tools import tpu_plan  # no jax at module level: safe before jax is imported

    if args.target == "tpu":
        chips = math.prod(int(d) for d in tpu_plan.resolve_topology(args.topology)[1].split(":")[1].split("x"))
        args.devices = chips * args.num_slices
        if tpu_plan.libtpu_version() is None:
            print(f"[plan] libtpu is not installed: CPU-backend estimate on {args.devices} fake devices "
                  "(pip install 'jax[tpu]' for the TPU compiler's figures)", file=sys.stderr)
            args.target = "cpu"
    runtime.fake_devices(args.devices)


def abstract_batch(config, setup) -> dict:
    """ShapeDtypeStructs of one global batch with its sharding (what the pipeline would deliver: the
    `model.batch` spec's pipeline keys)."""
    from notellm_jax import sharding as shd  # imports jax: only after before_jax (--devices fakes CPU devices)
    from notellm_jax.model.batch import BatchDims  # as above
    from notellm_jax.model.batch import abstract_batch as spec_batch  # as above

    dims = BatchDims(2 * config.train.batch_pairs, config.prompt.max_length, config.prompt.max_targets)
    return spec_batch(dims, sharding_of=lambda ndim: shd.batch_sharding(setup.mesh, ndim))


def build(config, mesh, num_layers: int | None = None):
    """(preset name, LlamaConfig, TrainSetup) of `config` on `mesh`, shapes only."""
    from notellm_jax.model.families import preset  # jax only after before_jax (--devices fakes CPU devices)
    from notellm_jax.train.step import make_train_setup  # as above
    from notellm_jax.weights.loading import runtime_llama_config  # as above

    name = config.model.checkpoint.split(":", 1)[1] if config.model.checkpoint.startswith("random:") else None
    if name is None:
        raise ValueError("planning needs model.checkpoint='random:<preset>' (shapes only, no weights)")
    llama_cfg = runtime_llama_config(config, preset(name))
    llama_cfg = llama_cfg.replace(vocab_size=llama_cfg.vocab_size + 1,  # [EMB]
                                  num_hidden_layers=num_layers or llama_cfg.num_hidden_layers)
    return name, llama_cfg, make_train_setup(config, llama_cfg, mesh, total_steps=1000)


def compile_step(config, setup):
    """(the compiled train step, compile seconds) for the setup's abstract state and one abstract batch."""
    from notellm_jax.train.step import compile_steps  # jax only after before_jax

    step_fn, _ = compile_steps(setup)
    start = time.time()
    compiled = step_fn.lower(setup.abstract_state, abstract_batch(config, setup)).compile()
    return compiled, round(time.time() - start, 1)


def describe(config, name: str, llama_cfg, setup) -> dict:
    """The plan's identity: model, mesh, policies, batch and the model FLOPs of one step."""
    from notellm_jax.train.metrics import StepFlops  # jax only after before_jax

    return {"model": name, "params_b": llama_cfg.num_params() / 1e9, "devices": setup.mesh.devices.size,
            "mesh": dict(setup.mesh.shape), "remat_policy": llama_cfg.remat_policy,
            "compute_dtype": llama_cfg.compute_dtype, "attention": config.model.attention,
            "grad_cache_chunk": config.train.grad_cache_chunk, "batch_pairs": config.train.batch_pairs,
            "seq_len": config.prompt.max_length,
            "model_tflops_per_step": StepFlops(llama_cfg, config, frozen_layers=0)(0) / 1e12}


def memory_figures(mem) -> dict:
    """XLA's per-device buffer assignment in GiB; donated state aliases its output, so live memory is
    arguments + temporaries + outputs - aliased outputs."""
    gib = 1024 ** 3
    return {"argument_gib": mem.argument_size_in_bytes / gib, "output_gib": mem.output_size_in_bytes / gib,
            "temp_gib": mem.temp_size_in_bytes / gib, "alias_gib": mem.alias_size_in_bytes / gib,
            "generated_code_gib": mem.generated_code_size_in_bytes / gib,
            "per_device_gib": (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
                               - mem.alias_size_in_bytes) / gib}


def plan(config, num_layers: int | None = None) -> dict:
    """Compile the train step for `config` on the current devices; nothing of the model is allocated.

    `num_layers` truncates the decoder (same widths): per-layer memory and the shipped remat policy at a
    fraction of the full model's compile time."""
    from notellm_jax import sharding as shd  # jax only after before_jax (--devices fakes CPU devices)

    name, llama_cfg, setup = build(config, shd.mesh_from_config(config.mesh), num_layers)
    compiled, compile_s = compile_step(config, setup)
    out = {"target": "cpu-backend", **describe(config, name, llama_cfg, setup), "compile_s": compile_s}
    mem = compiled.memory_analysis()
    if mem is not None:
        out.update(memory_figures(mem))
    return out


def plan_tpu(config, topology: str, num_slices: int = 1, num_layers: int | None = None,
             hlo_out: str | None = None) -> dict:
    """The train step compiled by the TPU compiler for `num_slices` slices of `topology` (tpu_plan); its HLO
    text goes to `hlo_out` when given (the report can be recomputed from it without compiling again)."""
    from notellm_jax.tools import tpu_plan  # jax inside: only after before_jax

    generation, topo = tpu_plan.resolve_topology(topology)
    devices = tpu_plan.topology_devices(topo, num_slices)
    name, llama_cfg, setup = build(config, tpu_plan.topology_mesh(config.mesh, devices, num_slices), num_layers)
    out = {"target": "tpu", "topology": topology, "libtpu": tpu_plan.libtpu_version(), "num_slices": num_slices,
           "device_kind": devices[0].device_kind, **describe(config, name, llama_cfg, setup)}
    try:
        compiled, out["compile_s"] = compile_step(config, setup)
    except Exception as err:  # noqa: BLE001 - the compiler's out-of-memory verdict is a result, not a crash
        if "RESOURCE_EXHAUSTED" not in str(err) and "memory" not in str(err).lower():
            raise
        return {**out, "fits": False, "compile_error": str(err).splitlines()[0][:2000]}
    out.update(memory_figures(compiled.memory_analysis()))
    if hlo_out:
        tpu_plan.write_text(hlo_out, compiled.as_text())
    return {**out, **tpu_plan.report(compiled, setup.mesh, generation, out)}


def run(args, config) -> dict:
    """`notellm plan`: compile the step ahead of time and print the memory and FLOP figures as JSON."""
    if args.target == "tpu":
        result = plan_tpu(config, args.topology, args.num_slices, hlo_out=args.hlo_out)
    else:
        result = plan(config)
    print(json.dumps(result))
    return result
