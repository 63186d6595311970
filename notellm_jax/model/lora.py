"""LoRA adapters (Hu et al. 2021) on the decoder's projections, without touching the decoder's code.

For a target projection with kernel W [*in, *out] (q/k/v/o_proj, gate/up/down_proj), rank r and alpha:
    y = x W + (alpha / r) (x A) B,   A [*in, r] (uniform +-1/sqrt(fan_in)), B [r, *out] (zeros)
so training starts at the base model. The extra term is added by a Flax method interceptor that matches
a module's path (e.g. ("decoder", "layers_3", "attn", "q_proj")) against the adapter tree
{"layers_3": {"attn": {"q_proj": {"a", "b"}}}}: the forward pass is the unmerged one, and `merge_lora`
folds (alpha / r) A B into W for export, after which the plain model gives the same outputs.
Layers must be unscanned (each layer has its own adapters).
"""
from __future__ import annotations

import contextlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Input axes of each target's kernel (o_proj contracts heads x head_dim).
_INPUT_AXES = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1, "up_proj": 1, "down_proj": 1}
_BLOCK = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_LAYER = re.compile(r"layers_\d+$")


def _check_targets(targets) -> None:
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        raise ValueError(f"LoRA targets {list(targets)}: choose among {', '.join(TARGETS)}")


def _targets_of(decoder: dict, targets, first_layer: int = 0) -> list[tuple[str, str, str]]:
    """(layer, block, projection) of every adapter: `targets` in layers first_layer and above (the layers
    over a frozen, cached bottom with `model.train_top_layers`; 0 = every layer)."""
    _check_targets(targets)
    if "layers" in decoder:
        raise ValueError("LoRA needs model.scan_layers=False (each layer gets its own adapters)")
    layers = sorted((k for k in decoder if _LAYER.match(k) and int(k.split("_")[1]) >= first_layer),
                    key=lambda k: int(k.split("_")[1]))
    return [(layer, _BLOCK[t], t) for layer in layers for t in targets]


def init_lora(decoder: dict, rank: int, targets, seed: int, first_layer: int = 0) -> dict:
    """Adapters for `targets` in the layers from `first_layer` of the (unscanned) decoder params, numpy float32."""
    rng = np.random.default_rng(seed)
    adapters: dict = {}
    for layer, block, name in _targets_of(decoder, targets, first_layer):
        shape = np.shape(decoder[layer][block][name]["kernel"])  # a global array need not be addressable
        n_in = _INPUT_AXES[name]
        fan_in = int(np.prod(shape[:n_in]))
        bound = 1.0 / np.sqrt(fan_in)
        a = rng.uniform(-bound, bound, (*shape[:n_in], rank)).astype(np.float32)
        b = np.zeros((rank, *shape[n_in:]), np.float32)
        adapters.setdefault(layer, {}).setdefault(block, {})[name] = {"a": a, "b": b}
    return adapters


def boxed_lora(boxed_decoder: dict, rank: int, targets, first_layer: int = 0) -> dict:
    """Logically partitioned ShapeDtypeStructs of the adapters: A shares W's input axes, B its output axes."""
    adapters: dict = {}
    for layer, block, name in _targets_of(boxed_decoder, targets, first_layer):
        kernel = boxed_decoder[layer][block][name]["kernel"]
        n_in, names = _INPUT_AXES[name], kernel.names
        shape, dtype = kernel.value.shape, kernel.value.dtype
        a = nn.Partitioned(jax.ShapeDtypeStruct((*shape[:n_in], rank), dtype), (*names[:n_in], None))
        b = nn.Partitioned(jax.ShapeDtypeStruct((rank, *shape[n_in:]), dtype), (None, *names[n_in:]))
        adapters.setdefault(layer, {}).setdefault(block, {})[name] = {"a": a, "b": b}
    return adapters


def merge_lora(decoder: dict, adapters: dict, scale: float) -> dict:
    """Decoder params with W + scale * A B in every adapted projection (the export's weights)."""
    merged = jax.tree.map(lambda x: x, decoder)  # fresh containers; leaves shared until replaced
    for layer, blocks in adapters.items():
        for block, names in blocks.items():
            for name, adapter in names.items():
                kernel = merged[layer][block][name]["kernel"]
                delta = scale * jnp.tensordot(adapter["a"], adapter["b"], axes=1)  # [*in, *out] = W's shape
                merged[layer][block][name] = {"kernel": (jnp.asarray(kernel, jnp.float32) + delta).astype(kernel.dtype)}
    return merged


@contextlib.contextmanager
def lora_applied(adapters: dict | None, scale: float, root: tuple[str, ...] = ("decoder",)):
    """While active, every adapted projection under module path `root` (NoteLLM's decoder; () for a bare
    Llama) adds scale * (x A) B to its output."""
    if not adapters:
        yield
        return

    def interceptor(next_fun, args, kwargs, context):
        path = tuple(context.module.path)
        if context.method_name != "__call__" or len(path) != len(root) + 3 or path[:len(root)] != root:
            return next_fun(*args, **kwargs)
        layer, block, name = path[len(root):]
        adapter = adapters.get(layer, {}).get(block, {}).get(name)
        if adapter is None:
            return next_fun(*args, **kwargs)
        out = next_fun(*args, **kwargs)
        x = args[0].astype(out.dtype)
        low = jnp.tensordot(x, adapter["a"].astype(out.dtype), axes=_INPUT_AXES[name])
        return out + (scale * jnp.tensordot(low, adapter["b"].astype(out.dtype), axes=1)).astype(out.dtype)

    with nn.intercept_methods(interceptor):
        yield


def lora_scale(rank: int, alpha: float) -> float:
    return float(alpha) / float(rank)


def split_adapters(params: dict) -> tuple[dict, Any]:
    """(model params without the "lora" entry, the adapters or None)."""
    if "lora" not in params:
        return params, None
    return {k: v for k, v in params.items() if k != "lora"}, params["lora"]
