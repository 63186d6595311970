"""The train state and the one jitted NoteLLM step.

State is created abstractly (`jax.eval_shape`) and born sharded from the logical-axis rules; the step is a
pure function of (state, batch), jitted with explicit shardings and the state donated, and computes the
[EMB] projection and both losses on the global batch laid out over the (data, fsdp, tensor) mesh.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import struct

from notellm_jax import sharding as shd
from notellm_jax.config import Config
from notellm_jax.model.llama import LlamaConfig
from notellm_jax.model.notellm import NoteLLM, notellm_losses
from notellm_jax.model.params import frozen_layer_count, merge_params, split_params
from notellm_jax.train.optim import make_optimizer

# Arrays the device step reads; the rest of a pipeline batch (task, note ids) stays on the host.
STEP_KEYS = ("input_ids", "hidden_in", "attention_mask", "embed_read_pos", "target_positions", "target_ids",
             "target_mask", "pair_id")


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


def make_model(config: Config, llama_cfg: LlamaConfig) -> NoteLLM:
    return NoteLLM(llama_cfg, emb_dim=config.model.emb_dim, log_logit_scale_init=config.model.log_logit_scale_init)


def example_batch(n: int = 2, length: int = 8, targets: int = 2) -> dict[str, jax.Array]:
    """The smallest batch with every key the model reads (for shape inference only)."""
    return {"input_ids": jnp.zeros((n, length), jnp.int32), "attention_mask": jnp.ones((n, length), jnp.int32),
            "embed_read_pos": jnp.zeros((n,), jnp.int32), "target_positions": jnp.zeros((n, targets), jnp.int32)}


def abstract_boxed_params(model: NoteLLM) -> Any:
    """Logically partitioned ShapeDtypeStructs of every parameter; nothing is allocated."""
    return jax.eval_shape(lambda rng: model.init(rng, example_batch())["params"], jax.random.key(0))


def abstract_params_on(model: NoteLLM, mesh) -> dict:
    """ShapeDtypeStructs of every parameter carrying its NamedSharding on `mesh` (the logical rules)."""
    boxed = abstract_boxed_params(model)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.meta.unbox(boxed),
                        shd.logical_shardings(boxed, mesh))


@dataclasses.dataclass
class TrainSetup:
    """The model, mesh and optimiser of a run, and its state's layout (shardings and abstract shapes)."""
    model: NoteLLM
    mesh: jax.sharding.Mesh
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    frozen_layers: int
    loss: LossConfig
    state_shardings: TrainState
    abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings (for AOT and restore)


def make_train_setup(config: Config, llama_cfg: LlamaConfig, mesh, total_steps: int) -> TrainSetup:
    model = make_model(config, llama_cfg)
    frozen_layers = frozen_layer_count(config.model.train_top_layers, llama_cfg)
    tx, schedule = make_optimizer(config.train, total_steps)
    boxed = abstract_boxed_params(model)
    trainable_boxed, frozen_boxed = split_params(boxed, frozen_layers)
    opt_boxed = jax.eval_shape(tx.init, trainable_boxed)
    state_boxed = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=trainable_boxed,
                             frozen=frozen_boxed, opt_state=opt_boxed)
    shardings = shd.logical_shardings(state_boxed, mesh)
    unboxed = nn.meta.unbox(state_boxed)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), unboxed, shardings)
    loss = LossConfig(alpha=float(config.train.alpha), objective=config.train.objective)
    return TrainSetup(model, mesh, tx, schedule, frozen_layers, loss, shardings, abstract)


def _place(value: Any, target: jax.ShapeDtypeStruct) -> jax.Array:
    """A parameter in the abstract state's sharding and dtype: a global array is resharded (kept as it is
    when it already matches), a host array is placed slice by slice."""
    if not isinstance(value, jax.Array):
        from notellm_jax.weights.loading import host_to_global
        return host_to_global(value, target)
    if value.dtype != target.dtype:
        value = value.astype(target.dtype)
    return value if value.sharding == target.sharding else jax.device_put(value, target.sharding)


def create_state(setup: TrainSetup, params: dict) -> TrainState:
    """The fresh train state from `params` (host arrays or `load_initial_params`' global arrays, which
    then become the state: the jitted step donates them)."""
    trainable, frozen = split_params(params, setup.frozen_layers)
    sh = setup.state_shardings
    trainable = jax.tree.map(_place, trainable, setup.abstract_state.params)
    frozen = jax.tree.map(_place, frozen, setup.abstract_state.frozen)
    opt_state = jax.jit(setup.tx.init, out_shardings=sh.opt_state)(trainable)
    step = jax.device_put(jnp.zeros((), jnp.int32), sh.step)
    return TrainState(step=step, params=trainable, frozen=frozen, opt_state=opt_state)


def _loss_and_metrics(setup: TrainSetup, params: dict, batch: dict):
    # A batch carrying the frozen bottom's output ("hidden_in") enters the decoder above the frozen layers.
    first_layer = setup.frozen_layers if "hidden_in" in batch else 0
    with shd.axis_rules(setup.mesh):
        outputs = setup.model.apply({"params": params}, batch, first_layer=first_layer)
    metrics = notellm_losses(outputs, batch, setup.loss.alpha, setup.loss.objective)
    return metrics["loss"], metrics


def train_step(state: TrainState, batch: dict, *, setup: TrainSetup) -> tuple[TrainState, dict]:
    def loss_fn(trainable):
        return _loss_and_metrics(setup, merge_params(trainable, state.frozen), batch)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "grad_norm": optax.global_norm(grads), "learning_rate": setup.schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(state: TrainState, batch: dict, *, setup: TrainSetup) -> dict:
    _, metrics = _loss_and_metrics(setup, merge_params(state.params, state.frozen), batch)
    return metrics


def compile_steps(setup: TrainSetup):
    """Jitted train and eval steps: explicit shardings, donated state, metrics replicated."""
    replicated = shd.replicated(setup.mesh)
    step = jax.jit(partial(train_step, setup=setup), donate_argnums=0,
                   out_shardings=(setup.state_shardings, replicated))
    evaluate = jax.jit(partial(eval_step, setup=setup), out_shardings=replicated)
    return step, evaluate


def to_global_batch(setup: TrainSetup, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This host's rows -> global arrays sharded over (data, fsdp)."""
    return {k: jax.make_array_from_process_local_data(shd.batch_sharding(setup.mesh, v.ndim), v)
            for k, v in local.items() if k in STEP_KEYS}
