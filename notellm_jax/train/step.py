"""The train state and the one jitted NoteLLM step.

State is created abstractly (`jax.eval_shape`) and born sharded from the logical-axis rules; the step is a
pure function of (state, batch), jitted with explicit shardings and the state donated, and computes the
[EMB] projection and both losses on the global batch laid out over the (data, fsdp, tensor) mesh.
"""
from __future__ import annotations

import dataclasses
import logging
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from notellm_jax import sharding as shd
from notellm_jax.config import Config
from notellm_jax.model.families import LlamaConfig
from notellm_jax.model.batch import as_step_arrays
from notellm_jax.model.lora import boxed_lora, lora_applied, lora_scale, merge_lora, split_adapters
from notellm_jax.model.notellm import NoteLLM, check_pairs, needs_logits, notellm_losses, pack_head_rows
from notellm_jax.model.params import abstract_boxed_params, frozen_layer_count, merge_params, split_params
from notellm_jax.train.grad_cache import grad_cache_loss_and_grads
from notellm_jax.train.optim import make_optimizer
from notellm_jax.weights.loading import make_model

logger = logging.getLogger(__name__)

@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any      # trainable parameters (the optimiser's tree)
    frozen: Any      # frozen parameters ({} when everything trains)
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The static settings the step's loss reads (hashable: the jitted step closes over it)."""
    alpha: float
    objective: str


def abstract_train_params(config: Config, model: NoteLLM) -> Any:
    """`abstract_boxed_params` plus the LoRA adapters when the run has them (above a frozen bottom, if any)."""
    boxed = abstract_boxed_params(model)
    if config.model.lora_rank > 0:
        first = frozen_layer_count(config.model.train_top_layers, model.llama)
        boxed = {**boxed, "lora": boxed_lora(boxed["decoder"], config.model.lora_rank, config.model.lora_targets, first)}
    return boxed


@dataclasses.dataclass
class TrainSetup:
    """The model, mesh and optimiser of a run, and its state's layout (shardings and abstract shapes)."""
    model: NoteLLM
    mesh: jax.sharding.Mesh
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    frozen_layers: int
    loss: LossConfig
    lora_scale: float           # alpha / rank of the LoRA adapters (0.0 without)
    grad_cache_chunk: int       # rows per chunk of the two-pass GradCache step (0 = one full-batch pass)
    head_rows_per_note: int     # LM head rows per note, packed across the batch (0 = every max_targets slot)
    state_shardings: TrainState
    abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings (for AOT and restore)


def make_train_setup(config: Config, llama_cfg: LlamaConfig, mesh, total_steps: int) -> TrainSetup:
    model = make_model(config, llama_cfg)
    frozen_layers = frozen_layer_count(config.model.train_top_layers, llama_cfg)
    tx, schedule = make_optimizer(config.train, total_steps)
    boxed = abstract_train_params(config, model)
    trainable_boxed, frozen_boxed = split_params(boxed, frozen_layers)
    opt_boxed = jax.eval_shape(tx.init, trainable_boxed)
    state_boxed = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=trainable_boxed,
                             frozen=frozen_boxed, opt_state=opt_boxed)
    abstract = shd.abstract_on(state_boxed, mesh)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    loss = LossConfig(alpha=float(config.train.alpha), objective=config.train.objective)
    scale = lora_scale(config.model.lora_rank, config.model.lora_alpha) if config.model.lora_rank > 0 else 0.0
    return TrainSetup(model, mesh, tx, schedule, frozen_layers, loss, scale, config.train.grad_cache_chunk,
                      config.train.head_rows_per_note, shardings, abstract)


def _place(value: Any, target: jax.ShapeDtypeStruct) -> jax.Array:
    """A parameter in the abstract state's dtype and sharding (so param_dtype holds for loaded weights as for
    random ones): a global array is cast and resharded (kept as it is when it already matches), a host
    array is placed slice by slice, each process touching (and casting) only its devices' slices."""
    if not isinstance(value, jax.Array):
        return shd.host_to_global(value, target)
    if value.dtype != target.dtype:
        value = value.astype(target.dtype)
    # Only an identical sharding is kept: an equivalent one on another Mesh object would leave the state's
    # shardings different from the abstract state's (what the step compiles for and orbax restores into).
    return value if value.sharding == target.sharding else jax.device_put(value, target.sharding)


def check_against_abstract(state: TrainState, abstract: TrainState) -> None:
    """Every leaf of a live state has the abstract state's shape, dtype and sharding (what the memory plan
    compiled for and what orbax restores into); raises naming the leaves that differ."""
    wrong = []
    for (path, live), want in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(abstract), strict=True):
        if (live.shape, live.dtype) != (want.shape, want.dtype) or \
                not live.sharding.is_equivalent_to(want.sharding, live.ndim):
            wrong.append(f"{jax.tree_util.keystr(path)}: {live.dtype}{list(live.shape)} {live.sharding} != "
                         f"{want.dtype}{list(want.shape)} {want.sharding}")
    if wrong:
        raise AssertionError("train state differs from the abstract state:\n  " + "\n  ".join(wrong))


def create_state(setup: TrainSetup, params: dict) -> TrainState:
    """The fresh train state from `params` (host arrays or `load_initial_params`' global arrays, which
    then become the state: the jitted step donates them)."""
    trainable, frozen = split_params(params, setup.frozen_layers)
    sh, abstract = setup.state_shardings, setup.abstract_state
    trainable = jax.tree.map(_place, trainable, abstract.params)
    frozen = jax.tree.map(_place, frozen, abstract.frozen)
    opt_state = jax.jit(setup.tx.init, out_shardings=sh.opt_state)(trainable)
    step = jax.device_put(jnp.zeros((), jnp.int32), sh.step)
    state = TrainState(step=step, params=trainable, frozen=frozen, opt_state=opt_state)
    check_against_abstract(state, abstract)
    return state


def apply_model(setup: TrainSetup, params: dict, batch: dict, with_logits: bool = True) -> dict:
    """NoteLLM outputs for `batch`, with the LoRA adapters (if `params` has them) in the forward pass.
    A batch carrying the frozen bottom's output ("hidden_in") enters the decoder above the frozen layers."""
    first_layer = setup.frozen_layers if "hidden_in" in batch else 0
    params, adapters = split_adapters(params)
    with shd.axis_rules(setup.mesh), lora_applied(adapters, setup.lora_scale):
        return setup.model.apply({"params": params}, batch, first_layer=first_layer, with_logits=with_logits)


def _loss_and_metrics(setup: TrainSetup, params: dict, batch: dict, with_logits: bool = True):
    metrics = notellm_losses(apply_model(setup, params, batch, with_logits), batch, setup.loss.alpha,
                             setup.loss.objective)
    return metrics["loss"], metrics


def loss_and_grads(state: TrainState, batch: dict, *, setup: TrainSetup) -> tuple[dict, Any]:
    """(metrics, gradients w.r.t. the trainable parameters): one full-batch backward pass, or the two-pass
    GradCache step (`train.grad_cache_chunk` > 0), which gives the same gradient in chunks of rows."""
    if setup.grad_cache_chunk > 0:
        def apply(trainable, rows, with_logits):
            return apply_model(setup, merge_params(trainable, state.frozen), rows, with_logits)
        return grad_cache_loss_and_grads(apply, state.params, batch, chunk_rows=setup.grad_cache_chunk,
                                         alpha=setup.loss.alpha, objective=setup.loss.objective)

    def loss_fn(trainable):  # a "gcl_only" step skips the head (eval_step still reports its val loss_gen)
        return _loss_and_metrics(setup, merge_params(trainable, state.frozen), batch,
                                 needs_logits(setup.loss.objective))

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return metrics, grads


def merged_params(setup: TrainSetup, state: TrainState) -> dict:
    """The full parameter tree as the export holds it: LoRA adapters merged, W + (alpha / r) A B, so every
    tool loads the result as a plain model."""
    params, adapters = split_adapters(merge_params(state.params, state.frozen))
    if adapters:
        params = {**params, "decoder": merge_lora(params["decoder"], adapters, setup.lora_scale)}
    return params


def train_step(state: TrainState, batch: dict, *, setup: TrainSetup) -> tuple[TrainState, dict]:
    metrics, grads = loss_and_grads(state, batch, setup=setup)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A step with a non-finite loss or gradient norm changes nothing but the step (its batch is consumed);
    # the loop's TrainingGuard decides whether training may go on.
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), (params, opt_state),
                                     (state.params, state.opt_state))
    metrics = {**metrics, "grad_norm": grad_norm, "learning_rate": setup.schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(state: TrainState, batch: dict, *, setup: TrainSetup) -> dict:
    _, metrics = _loss_and_metrics(setup, merge_params(state.params, state.frozen), batch)
    return metrics


def compile_steps(setup: TrainSetup):
    """Jitted train and eval steps: explicit in/out shardings (the state's own; every batch array's leading
    axis over (data, fsdp), whichever `model.batch` keys a batch has), donated state, metrics replicated."""
    replicated = shd.replicated(setup.mesh)
    in_shardings = (setup.state_shardings, batch_sharding(setup))
    step = jax.jit(partial(train_step, setup=setup), donate_argnums=0, in_shardings=in_shardings,
                   out_shardings=(setup.state_shardings, replicated))
    evaluate = jax.jit(partial(eval_step, setup=setup), in_shardings=in_shardings, out_shardings=replicated)
    return step, evaluate


def batch_sharding(setup: TrainSetup) -> jax.sharding.NamedSharding:
    """The sharding of every array of a global batch: rows over (data, fsdp), the rest replicated (a
    PartitionSpec shorter than an array's rank leaves its other axes whole, so one sharding fits all keys)."""
    return shd.batch_sharding(setup.mesh, 1)


def to_global_batch(setup: TrainSetup, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This host's rows -> global arrays sharded over (data, fsdp), after the host check of its pairs.

    Both notes of a pair always sit on the same host, so the local check covers the global batch."""
    check_pairs(local["pair_id"], local.get("note_index"))
    if setup.head_rows_per_note and needs_logits(setup.loss.objective):
        packed = pack_head_rows(local["target_mask"], local["target_ids"], setup.head_rows_per_note)
        if packed is None:
            logger.info("a batch with %d supervised tokens > %d head rows runs the unpacked step",
                        int(np.count_nonzero(local["target_mask"])), setup.head_rows_per_note * len(local["pair_id"]))
        else:
            local = {**{k: v for k, v in local.items() if k not in ("target_ids", "target_mask")}, **packed}
    local = as_step_arrays(local)  # the spec's keys in its dtypes (note_index: int64 on the host, int32 here)
    return {k: jax.make_array_from_process_local_data(shd.batch_sharding(setup.mesh, v.ndim), v)
            for k, v in local.items()}
