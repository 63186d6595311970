"""Accelerator suite: the numbers issue 10 asks of one GPU (or TPU) chip, as one JSON file.

    python bench/accelerator_suite.py --out results.json [--small] [--steps 5]

(a) "smollm2": the SmolLM2-135M-shaped full fine-tune step (configs/smollm2_se.py:full: 128 notes x 192
    tokens, bf16 compute, scanned layers, the shipped remat policy), random weights of that shape, synthetic
    batches: MFU and tokens/s, JAX vs PyTorch (transformers' LlamaModel, sdpa attention, bf16 autocast) on
    the same weights and batch.
(b) "llama2_7b": the LLaMA-2-7B-shaped step (configs/paper_7b.py:llama2_7b: 64 pairs x 192 tokens, bf16, real 7B
    widths) with as many layers as fit the chip: the per-layer memory is read off two AOT compiles (XLA's
    buffer assignment), the depth is the largest that leaves `--headroom` of the chip's memory free, and the
    program at that depth is compiled again to check. MFU per chip.
(c) "attention": both steps once per attention implementation (einsum, dot_product; splash on TPU), and
    each implementation's share of the step: its attention core's forward + backward on the step's
    q/k/v shapes, timed alone and summed over the layers, over the step time.

--small: the tiny preset (64 wide; 4 layers in (a), 2 in (b)), 8 notes x 32 tokens, fp32 (so JAX's and
PyTorch's first losses agree to 1e-4) on any backend: what the test suite runs on CPU.
Imports only jax, flax, optax, orbax, numpy, torch and transformers (no TensorFlow, ScaNN or gguf).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from notellm_jax import runtime

runtime.set_environment_defaults()  # before transformers is imported

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step  # noqa: E402  (bench/train_step.py: the JAX/PyTorch step comparison)

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = str(REPO / "configs" / "smollm2_se.py") + ":full"
LLAMA2_7B = str(REPO / "configs" / "paper_7b.py") + ":llama2_7b,aot"
SMALL = ["train.batch_pairs=4", "prompt.max_length=32", "prompt.max_targets=4", "model.compute_dtype=float32"]


def implementations() -> list[str]:
    return ["einsum", "dot_product"] + (["splash"] if jax.default_backend() == "tpu" else [])


def overrides_for(impl: str, small: bool) -> list[str]:
    return [f"model.attention={impl}", *(SMALL + ["model.checkpoint=random:tiny"] if small else [])]


def smollm2(args) -> dict:
    """(a) and its part of (c): every implementation's JAX step; PyTorch once (its own sdpa attention)."""
    from notellm_jax.model.families import preset
    from notellm_jax.weights.loading import runtime_llama_config
    out = {}
    for impl in implementations():
        config = train_step.benchmark_config(SMOLLM2, overrides_for(impl, args.small))
        out[impl] = train_step.compare(config, args.steps, with_torch=impl == "einsum")
        cfg = runtime_llama_config(config, preset(config.model.checkpoint.split(":", 1)[1]))
        out[impl]["attention_share"] = attention_share(config, cfg, out[impl]["jax"]["step_s"], args.steps)
    return out


def attention_share(config, cfg, step_s: float, steps: int) -> dict:
    """The step's attention cores alone (forward + backward, every layer of `cfg`) and their share of `step_s`."""
    from notellm_jax.model.attention import attend
    n, t = 2 * config.train.batch_pairs, config.prompt.max_length
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(n, t, cfg.num_attention_heads, cfg.head_dim)), cfg.dtype)
    k, v = (jnp.asarray(rng.normal(size=(n, t, cfg.num_key_value_heads, cfg.head_dim)), cfg.dtype) for _ in "kv")
    key_mask = jnp.ones((n, t), jnp.int32)
    allowed = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (n, t, t))

    def loss(q, k, v):
        out = attend(q, k, v, allowed, key_mask, implementation=cfg.attention, precision=cfg.precision)
        return jnp.sum(out.astype(jnp.float32))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    jax.block_until_ready(grad(q, k, v))
    start = time.time()
    for _ in range(steps):
        jax.block_until_ready(grad(q, k, v))
    per_layer = (time.time() - start) / steps
    return {"per_layer_s": per_layer, "layers": cfg.num_hidden_layers,
            "share_of_step": per_layer * cfg.num_hidden_layers / step_s}


def compiled_step(config, layers: int):
    """(spec, llama config, AOT-compiled train step, per-device bytes XLA assigns) at `layers` layers."""
    from notellm_jax import sharding as shd
    from notellm_jax.model.families import preset
    from notellm_jax.tools.plan import abstract_batch
    from notellm_jax.train.step import compile_steps, make_train_setup
    from notellm_jax.weights.loading import runtime_llama_config
    base = preset(config.model.checkpoint.split(":", 1)[1])
    llama_cfg = runtime_llama_config(config, base).replace(vocab_size=base.vocab_size + 1, num_hidden_layers=layers)
    spec = make_train_setup(config, llama_cfg, shd.make_mesh(1, -1, 1), total_steps=1000)
    step_fn, _ = compile_steps(spec)
    compiled = step_fn.lower(spec.abstract_state, abstract_batch(config, spec)).compile()
    mem = compiled.memory_analysis()
    used = None if mem is None else (mem.argument_size_in_bytes + mem.temp_size_in_bytes +
                                     mem.output_size_in_bytes - mem.alias_size_in_bytes)
    return spec, llama_cfg, compiled, used


def fitting_step(config, headroom: float, small: bool):
    """The compiled step with the most layers that leaves `headroom` of the chip's memory free: the
    per-layer bytes come from the 2- and 4-layer programs, the chosen depth is compiled and checked."""
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    if small or limit is None:  # CPU: no memory to fill
        return (*compiled_step(config, 2), {"device_bytes": limit})
    two, four = compiled_step(config, 2)[3], compiled_step(config, 4)[3]
    per_layer, fixed = (four - two) / 2, two - (four - two)
    layers = max(1, min(32, int(((1 - headroom) * limit - fixed) // per_layer)))
    while True:
        spec, llama_cfg, compiled, used = compiled_step(config, layers)
        if used <= (1 - headroom) * limit or layers == 1:
            return spec, llama_cfg, compiled, used, {"device_bytes": limit, "per_layer_bytes": per_layer,
                                                     "fixed_bytes": fixed}
        layers -= 1


def random_state(spec):
    """A random train state created on the devices in its final shardings (jitted init: no host copy)."""
    from flax import linen as nn

    from notellm_jax.model.params import example_batch
    from notellm_jax.train.step import TrainState
    init = jax.jit(lambda rng: nn.meta.unbox(spec.model.init(rng, example_batch())["params"]),
                   out_shardings=spec.state_shardings.params)
    params = init(jax.random.key(0))
    opt_state = jax.jit(spec.tx.init, out_shardings=spec.state_shardings.opt_state)(params)
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), spec.state_shardings.step), params=params,
                      frozen={}, opt_state=opt_state)


def llama2_7b(args) -> dict:
    """(b) and its part of (c): the depth is chosen once (einsum) and kept for the other implementations."""
    from notellm_jax.train.step import to_global_batch
    out, layers = {}, None
    for impl in implementations():
        config = train_step.benchmark_config(LLAMA2_7B, overrides_for(impl, args.small))
        if layers is None:
            spec, llama_cfg, compiled, used, memory = fitting_step(config, args.headroom, args.small)
            layers = llama_cfg.num_hidden_layers
        else:
            spec, llama_cfg, compiled, used = compiled_step(config, layers)
        batch = to_global_batch(spec, train_step.step_batch(config, llama_cfg, 0))
        _, first_loss, first_s, step_s = train_step.time_steps(compiled, random_state(spec), batch, args.steps)
        out[impl] = {"layers": layers, **memory, "compiled_bytes": used, "first_step_s": first_s,
                     "first_step_loss": first_loss,
                     **train_step.throughput(config, train_step.step_flops(config, llama_cfg, 0), step_s),
                     "attention_share": attention_share(config, llama_cfg, step_s, args.steps)}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU tests)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement (median)")
    parser.add_argument("--headroom", type=float, default=0.1, help="share of chip memory left free in (b)")
    parser.add_argument("--parts", default="smollm2,llama2_7b", help="comma-separated subset")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    result = {"benchmark": "accelerator_suite", "small": args.small, "machine": platform.node(),
              "backend": jax.default_backend(), "device": device.device_kind, "device_count": jax.device_count(),
              "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""), "steps": args.steps}
    start = time.time()
    for part in args.parts.split(","):
        result[part] = {"smollm2": smollm2, "llama2_7b": llama2_7b}[part](args)
        result["wall_s"] = time.time() - start
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))  # after each part: a partial file survives a kill
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
