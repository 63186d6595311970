"""NoteLLM trainer: `python -m notellm_jax.train --config configs/<name>.py [--set section.field=value ...]`.

One jitted step (explicit in/out shardings, donated state) computes the [EMB] projection and both losses
(GCL + CSFT) on the global batch laid out over a (data, fsdp, tensor) mesh. State is created abstractly
and born sharded; batches become global arrays with `jax.make_array_from_process_local_data`; Orbax
saves {state, data position} periodically and the run resumes from (seed, step).

With `model.train_top_layers = k` only the top k decoder layers (plus final norm, projection and tau)
train; the frozen bottom's hidden states depend on the token ids alone, so they are computed once per
distinct sequence and cached on the host (`FeatureCache`), which makes CPU fine-tuning practical.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import time
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import notellm_jax  # noqa: F401  (environment defaults before transformers is imported)
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import struct
from flax.traverse_util import flatten_dict, unflatten_dict

from notellm_jax import sharding as shd
from notellm_jax.config import Config, add_config_args, config_from_args
from notellm_jax.distributed import init_distributed, is_primary
from notellm_jax.feature_cache import FeatureCache, cache_path
from notellm_jax.metrics import MetricsWriter, peak_flops_per_device, train_step_flops
from notellm_jax.model.llama import LlamaConfig, init_params, preset, stack_layers
from notellm_jax.model.notellm import NoteLLM, notellm_losses
from notellm_jax.optim import make_optimizer

logger = logging.getLogger("notellm_jax.train")

# Arrays the device step reads; the rest of a pipeline batch (task, seq_id, note ids) stays on the host.
STEP_KEYS = ("input_ids", "hidden_in", "attention_mask", "emb_index", "target_positions", "target_ids",
             "target_mask", "pair_id")


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any      # trainable parameters (the optimiser's tree)
    frozen: Any      # frozen parameters ({} when everything trains)
    opt_state: Any


# --------------------------------------------------------------------------------------------------
# Model and parameters


def runtime_fields(config: Config) -> dict[str, Any]:
    """The LlamaConfig fields a run chooses (not the checkpoint)."""
    m = config.model
    return dict(compute_dtype=m.compute_dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers,
                remat_policy=m.remat_policy, vocab_pad_multiple=m.vocab_pad_multiple)


def runtime_llama_config(config: Config, base: LlamaConfig) -> LlamaConfig:
    return base.replace(**runtime_fields(config))


def _check_emb_vocab(emb_vocab_size: int | None, base_vocab: int, ckpt: str) -> int:
    """How many entries to add to the checkpoint's vocabulary: 1 ([EMB]) with a tokenizer, else 0."""
    if emb_vocab_size is None:
        return 0
    if emb_vocab_size != base_vocab + 1:
        raise ValueError(f"tokenizer has {emb_vocab_size - 1} base tokens but the checkpoint {ckpt} has a "
                         f"{base_vocab}-row embedding table: they do not belong together")
    return 1


def _random_decoder(base: LlamaConfig, new_tokens: int, seed: int, abstract: dict) -> dict:
    """Random decoder weights created by one jitted program directly in their shardings (never whole on
    one device). Initialised unscanned and stacked inside the program, so scan_layers does not change
    the weights; the [EMB] entries and the vocabulary padding as `grow_vocab` makes them."""
    from notellm_jax.checkpoints import grow_vocab

    def init(key):
        params = init_params(base.replace(scan_layers=False, vocab_pad_multiple=1), key)
        params, _ = grow_vocab(params, base, new_tokens)
        if base.scan_layers:
            params = stack_layers(params, stack=jnp.stack)
        return jax.tree.map(lambda p, a: p.astype(a.dtype), params, abstract)

    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))


def _host_to_global(value: np.ndarray, target: jax.ShapeDtypeStruct) -> jax.Array:
    value = np.asarray(value)
    return jax.make_array_from_callback(target.shape, target.sharding,
                                        lambda index: value[index].astype(target.dtype))


def load_initial_params(config: Config, emb_vocab_size: int | None, mesh=None,
                        on_leaf=None) -> tuple[dict, LlamaConfig]:
    """Pretrained (or random) decoder weights with the [EMB] row added, plus fresh projection and tau, born
    sharded on `mesh` (default: the config's) in the model's param dtype: each process reads only the
    checkpoint slices its devices hold (`checkpoints.place_params`; `on_leaf(name)` runs after each
    parameter is placed).

    `emb_vocab_size` is the tokenizer's vocabulary including [EMB] (whose id must be the base vocab size).
    """
    mesh = mesh or shd.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    ckpt = config.model.checkpoint
    if ckpt.startswith("random:"):
        base = runtime_llama_config(config, preset(ckpt.split(":", 1)[1]))
        new_tokens = _check_emb_vocab(emb_vocab_size, base.vocab_size, ckpt)
        llama_cfg = base.replace(vocab_size=base.vocab_size + new_tokens)
        abstract = abstract_params_on(make_model(config, llama_cfg), mesh)
        decoder = _random_decoder(base, new_tokens, config.train.seed, abstract["decoder"])
    else:
        from notellm_jax.checkpoints import open_params, place_params
        new_tokens = 0 if emb_vocab_size is None else 1
        lazy, llama_cfg = open_params(config.resolve(ckpt), new_tokens, **runtime_fields(config))
        _check_emb_vocab(emb_vocab_size, llama_cfg.vocab_size - new_tokens, ckpt)
        abstract = abstract_params_on(make_model(config, llama_cfg), mesh)
        decoder = place_params(lazy, abstract["decoder"], on_leaf)
    rng = np.random.default_rng(config.train.seed)
    proj = rng.normal(0.0, llama_cfg.hidden_size ** -0.5, (llama_cfg.hidden_size, config.model.emb_dim))
    params = {"decoder": decoder, "proj": {"kernel": _host_to_global(proj, abstract["proj"]["kernel"])},
              "tau": _host_to_global(np.asarray(config.model.tau_init, np.float32), abstract["tau"])}
    return params, llama_cfg


def make_model(config: Config, llama_cfg: LlamaConfig) -> NoteLLM:
    return NoteLLM(llama_cfg, emb_dim=config.model.emb_dim, tau_init=config.model.tau_init)


def frozen_layer_count(config: Config, llama_cfg: LlamaConfig) -> int:
    k = config.model.train_top_layers
    if k <= 0 or k >= llama_cfg.num_hidden_layers:
        return 0
    if llama_cfg.scan_layers:
        raise ValueError("model.train_top_layers needs model.scan_layers=False (frozen layers are sliced off)")
    return llama_cfg.num_hidden_layers - k


_LAYER = re.compile(r"layers_(\d+)$")


def _is_frozen(path: tuple[str, ...], frozen_layers: int) -> bool:
    if frozen_layers == 0 or path[0] != "decoder":
        return False
    if path[1] == "embed_tokens":
        return True
    match = _LAYER.match(path[1])
    return bool(match) and int(match.group(1)) < frozen_layers


def split_params(params: dict, frozen_layers: int) -> tuple[dict, dict]:
    """(trainable, frozen): the embedding table and layers [0, frozen_layers) are frozen."""
    flat = flatten_dict(params)
    trainable = {k: v for k, v in flat.items() if not _is_frozen(k, frozen_layers)}
    frozen = {k: v for k, v in flat.items() if _is_frozen(k, frozen_layers)}
    return unflatten_dict(trainable), (unflatten_dict(frozen) if frozen else {})


def merge_params(trainable: dict, frozen: dict) -> dict:
    if not frozen:
        return trainable
    return unflatten_dict({**flatten_dict(frozen), **flatten_dict(trainable)})


def _dummy_batch(llama_cfg: LlamaConfig, n: int = 2, length: int = 8, targets: int = 2) -> dict[str, jax.Array]:
    return {"input_ids": jnp.zeros((n, length), jnp.int32), "attention_mask": jnp.ones((n, length), jnp.int32),
            "emb_index": jnp.zeros((n,), jnp.int32), "target_positions": jnp.zeros((n, targets), jnp.int32)}


def abstract_boxed_params(model: NoteLLM) -> Any:
    """Logically partitioned ShapeDtypeStructs of every parameter; nothing is allocated."""
    batch = _dummy_batch(model.llama)
    return jax.eval_shape(lambda rng: model.init(rng, batch)["params"], jax.random.key(0))


def abstract_params_on(model: NoteLLM, mesh) -> dict:
    """ShapeDtypeStructs of every parameter carrying its NamedSharding on `mesh` (the logical rules)."""
    boxed = abstract_boxed_params(model)
    shardings = shd.logical_shardings(boxed, mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.meta.unbox(boxed),
                        shardings)


# --------------------------------------------------------------------------------------------------
# Sharded state


@dataclasses.dataclass
class StateSpec:
    """Everything about the train state's layout: shardings for state and batch, the optimiser."""
    model: NoteLLM
    mesh: jax.sharding.Mesh
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    frozen_layers: int
    state_shardings: TrainState
    abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings (for AOT and restore)


def make_state_spec(config: Config, llama_cfg: LlamaConfig, mesh, total_steps: int) -> StateSpec:
    model = make_model(config, llama_cfg)
    frozen_layers = frozen_layer_count(config, llama_cfg)
    tx, schedule = make_optimizer(config.train, total_steps)
    boxed = abstract_boxed_params(model)
    trainable_boxed, frozen_boxed = split_params(boxed, frozen_layers)
    opt_boxed = jax.eval_shape(tx.init, trainable_boxed)
    state_boxed = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=trainable_boxed,
                             frozen=frozen_boxed, opt_state=opt_boxed)
    shardings = shd.logical_shardings(state_boxed, mesh)
    unboxed = nn.meta.unbox(state_boxed)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), unboxed, shardings)
    return StateSpec(model, mesh, tx, schedule, frozen_layers, shardings, abstract)


def _place(value: Any, target: jax.ShapeDtypeStruct) -> jax.Array:
    """A parameter in the abstract state's sharding and dtype: a global array is resharded (kept as it is
    when it already matches), a host array is placed slice by slice."""
    if not isinstance(value, jax.Array):
        return _host_to_global(value, target)
    if value.dtype != target.dtype:
        value = value.astype(target.dtype)
    return value if value.sharding == target.sharding else jax.device_put(value, target.sharding)


def create_state(spec: StateSpec, params: dict) -> TrainState:
    """The fresh train state from `params` (host arrays or `load_initial_params`' global arrays, which
    then become the state: the jitted step donates them)."""
    trainable, frozen = split_params(params, spec.frozen_layers)
    target = spec.abstract_state
    trainable = jax.tree.map(_place, trainable, target.params)
    frozen = jax.tree.map(_place, frozen, target.frozen)
    opt_state = jax.jit(spec.tx.init, out_shardings=spec.state_shardings.opt_state)(trainable)
    step = jax.device_put(jnp.zeros((), jnp.int32), spec.state_shardings.step)
    return TrainState(step=step, params=trainable, frozen=frozen, opt_state=opt_state)


# --------------------------------------------------------------------------------------------------
# The step


def _loss_and_metrics(model: NoteLLM, params: dict, batch: dict, config: Config, first_layer: int, mesh):
    with shd.axis_rules(mesh):
        outputs = model.apply({"params": params}, batch, first_layer=first_layer)
    metrics = notellm_losses(outputs, batch, config.train.alpha, config.train.objective)
    return metrics["loss"], metrics


def train_step(state: TrainState, batch: dict, *, spec: StateSpec, config: Config) -> tuple[TrainState, dict]:
    first_layer = spec.frozen_layers if "hidden_in" in batch else 0

    def loss_fn(trainable):
        return _loss_and_metrics(spec.model, merge_params(trainable, state.frozen), batch, config, first_layer,
                                 spec.mesh)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = spec.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "grad_norm": optax.global_norm(grads), "learning_rate": spec.schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(state: TrainState, batch: dict, *, spec: StateSpec, config: Config) -> dict:
    first_layer = spec.frozen_layers if "hidden_in" in batch else 0
    _, metrics = _loss_and_metrics(spec.model, merge_params(state.params, state.frozen), batch, config, first_layer,
                                   spec.mesh)
    return metrics


def batch_shardings(spec: StateSpec, batch: dict) -> dict:
    return {k: shd.batch_sharding(spec.mesh, np.ndim(v)) for k, v in batch.items()}


def compile_steps(spec: StateSpec, config: Config):
    """Jitted train and eval steps: explicit shardings, donated state, metrics replicated."""
    replicated = shd.replicated(spec.mesh)
    step = jax.jit(partial(train_step, spec=spec, config=config), donate_argnums=0,
                   out_shardings=(spec.state_shardings, replicated))
    evaluate = jax.jit(partial(eval_step, spec=spec, config=config), out_shardings=replicated)
    return step, evaluate


def to_global_batch(spec: StateSpec, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This host's rows -> global arrays sharded over (data, fsdp)."""
    return {k: jax.make_array_from_process_local_data(shd.batch_sharding(spec.mesh, v.ndim), v)
            for k, v in local.items() if k in STEP_KEYS}


# --------------------------------------------------------------------------------------------------
# Data


def synthetic_batches(config: Config, llama_cfg: LlamaConfig, start_step: int, *, process_index: int | None = None,
                      process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Random token batches with the pipeline's shapes and layout, for performance runs (no TF needed).

    A step's GLOBAL batch depends on (seed, step) alone; host h keeps pairs [h*b, (h+1)*b), laid out
    [a..., b...] like the pipeline, so any process count trains on the same global batch (up to row order).
    """
    host = jax.process_index() if process_index is None else process_index
    b = config.train.batch_pairs // (jax.process_count() if process_count is None else process_count)
    n, length, targets = 2 * b, config.prompt.max_length, config.prompt.max_targets
    step = start_step
    while True:
        rng = np.random.default_rng([config.train.seed, step])

        def draw(high: int, *shape: int, dtype=np.int64) -> np.ndarray:
            """This host's rows of a global (side, pair, *shape) draw."""
            full = rng.integers(0, high, (2, config.train.batch_pairs, *shape), dtype=dtype)
            return full[:, host * b:(host + 1) * b].reshape(n, *shape)

        emb_index = np.full((n,), length - targets - 2, np.int32)
        positions = (emb_index[:, None] + 2 + np.arange(targets)[None, :]).astype(np.int32)
        positions = np.minimum(positions, length - 1)
        pair = np.arange(b, dtype=np.int32) + host * b
        yield {"input_ids": draw(llama_cfg.vocab_size - 1, length, dtype=np.int32),
               "attention_mask": np.ones((n, length), np.int32), "emb_index": emb_index,
               "target_positions": positions,
               "target_ids": draw(llama_cfg.vocab_size - 1, targets, dtype=np.int32),
               "target_mask": np.ones((n, targets), np.float32), "pair_id": np.concatenate([pair, pair]),
               "seq_id": draw(2**62)}
        step += 1


def batches(config: Config, llama_cfg: LlamaConfig, split: str, start_step: int) -> Iterator[dict[str, np.ndarray]]:
    if config.train.synthetic_data:
        return synthetic_batches(config, llama_cfg, start_step)
    from notellm_jax.data import pipeline
    return iter(pipeline.make_train_dataset(config, config.data_dir, split=split,
                                            process_index=jax.process_index(),
                                            process_count=jax.process_count(), start_step=start_step))


def total_train_steps(config: Config) -> int:
    if config.train.max_steps > 0:
        return config.train.max_steps
    if config.train.synthetic_data:
        raise ValueError("train.synthetic_data needs train.max_steps > 0")
    from notellm_jax.data import pipeline
    per_epoch = pipeline.steps_per_epoch(config, config.data_dir, process_count=jax.process_count())
    steps = int(np.ceil(config.train.epochs * per_epoch))
    if steps <= 0:
        raise ValueError(f"no training steps: check the training pairs under {config.data_dir}")
    return steps


# --------------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_dir(config: Config):
    """`train.checkpoint_dir` (a local path or an orbax URL like gs://...) or <work_dir>/checkpoints."""
    from etils import epath
    if "://" in config.train.checkpoint_dir:
        return epath.Path(config.train.checkpoint_dir)
    return Path(config.train.checkpoint_dir or config.work_dir / "checkpoints").absolute()


def checkpoint_manager(config: Config):
    import orbax.checkpoint as ocp
    options = ocp.CheckpointManagerOptions(max_to_keep=config.train.keep_checkpoints,
                                           enable_async_checkpointing=config.train.async_checkpoint)
    return ocp.CheckpointManager(checkpoint_dir(config), options=options, item_names=("state", "meta"))


def save_checkpoint(manager, state: TrainState, config: Config, total_steps: int, force: bool = False) -> None:
    import orbax.checkpoint as ocp
    step = int(state.step)
    meta = {"step": step, "seed": config.train.seed, "data_position": step, "total_steps": total_steps,
            "config": config.to_dict()}
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                 force=force)


def restore_checkpoint(manager, spec: StateSpec, config: Config, total_steps: int) -> TrainState | None:
    """The latest checkpoint restored onto this run's mesh (any mesh shape), or None."""
    import orbax.checkpoint as ocp
    step = manager.latest_step()
    if step is None:
        return None
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(spec.abstract_state),
                                                             meta=ocp.args.JsonRestore()))
    meta = restored["meta"]
    if meta["seed"] != config.train.seed:
        raise ValueError(f"checkpoint at step {step} was trained with seed {meta['seed']}, this run has "
                         f"seed {config.train.seed}: resuming would not reproduce the data order")
    if meta.get("total_steps", total_steps) != total_steps:
        logger.warning("resuming a run planned for %d steps with %d steps: the learning-rate schedule changes, "
                       "so the result will differ from an uninterrupted run", meta["total_steps"], total_steps)
    return restored["state"]


def export_params(config: Config, state: TrainState, llama_cfg: LlamaConfig, tokenizer_path: str) -> Path:
    """Param-only export for the embedding / eval tools: orbax params + notellm.json. Called by every
    process; each writes its own shards of the sharded parameters (no gather)."""
    from notellm_jax.model.export import save_notellm
    params = merge_params(state.params, state.frozen)
    return save_notellm(config.work_dir / "export", params, llama_cfg, config, tokenizer_path)


# --------------------------------------------------------------------------------------------------
# The loop


def _check_batch_layout(config: Config, mesh) -> None:
    pairs = config.train.batch_pairs
    if pairs % jax.process_count():
        raise ValueError(f"train.batch_pairs={pairs} is not divisible by the {jax.process_count()} processes")
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if (2 * pairs) % shards:
        raise ValueError(f"the global batch of 2 x {pairs} notes does not divide over data x fsdp = {shards}")


def tokenizer_path(config: Config) -> str:
    return str(config.resolve(config.model.tokenizer or config.model.checkpoint))


def train(config: Config) -> dict[str, Any]:
    """Run (or resume) training; returns the last logged metrics."""
    init_distributed()
    mesh = shd.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    _check_batch_layout(config, mesh)
    if config.train.synthetic_data:
        emb_vocab = None
    else:
        from notellm_jax.tokenizer import load_tokenizer
        emb_vocab = load_tokenizer(tokenizer_path(config), config.prompt.emb_token).vocab_size
    params, llama_cfg = load_initial_params(config, emb_vocab, mesh)
    total_steps = total_train_steps(config)
    spec = make_state_spec(config, llama_cfg, mesh, total_steps)
    use_cache = spec.frozen_layers > 0 and config.model.cache_frozen_features
    if use_cache and jax.process_count() > 1:
        raise ValueError("model.cache_frozen_features works in one process; set it False for multi-host runs")

    manager = checkpoint_manager(config)
    state = restore_checkpoint(manager, spec, config, total_steps)
    if state is None:
        state = create_state(spec, params)
    del params
    start_step = int(state.step)
    step_fn, eval_fn = compile_steps(spec, config)
    cache = None
    if use_cache:
        path = (cache_path(config.data_dir, config.model.checkpoint, spec.frozen_layers, state.frozen)
                if config.model.persist_feature_cache else None)
        cache = FeatureCache(spec.model, spec.mesh, spec.frozen_layers, path=path,
                             max_bytes=config.model.feature_cache_max_gb * 1e9)

    primary = is_primary()
    if primary:
        config.work_dir.mkdir(parents=True, exist_ok=True)
        (config.work_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        n_train = sum(x.size for x in jax.tree.leaves(state.params))
        n_all = n_train + sum(x.size for x in jax.tree.leaves(state.frozen))
        print(f"[train] {config.name}: {n_all / 1e6:.1f}M parameters ({n_train / 1e6:.1f}M trained), "
              f"mesh {dict(mesh.shape)}, steps {start_step}->{total_steps}, "
              f"{2 * config.train.batch_pairs} notes x {config.prompt.max_length} tokens per step", flush=True)
    writer = MetricsWriter(config.work_dir / "logs", total_steps, enabled=primary, start_step=start_step)
    n_notes = 2 * config.train.batch_pairs
    peak = peak_flops_per_device() * jax.device_count()

    def step_flops(frozen_rows: int) -> float:
        """Trained layers for every row; the frozen bottom only for rows it actually ran on."""
        length = config.prompt.max_length
        trained = train_step_flops(llama_cfg, sequences=n_notes, seq_len=length, targets=config.prompt.max_targets,
                                   emb_dim=config.model.emb_dim,
                                   trained_layers=llama_cfg.num_hidden_layers - spec.frozen_layers,
                                   forward_only_layers=0)
        bottom = train_step_flops(llama_cfg, sequences=frozen_rows, seq_len=length, targets=0, emb_dim=0,
                                  trained_layers=0, forward_only_layers=spec.frozen_layers)
        return trained + bottom

    data = batches(config, llama_cfg, "train", start_step)
    last: dict[str, Any] = {}
    window_start, window_flops, window_tokens, window = time.time(), 0.0, 0, []
    for step in range(start_step, total_steps):
        local = next(data)
        if cache:
            misses_before = cache.misses
            local = cache(state.frozen, local)
            frozen_rows = cache.misses - misses_before
        else:
            frozen_rows = n_notes if spec.frozen_layers else 0
        state, metrics = step_fn(state, to_global_batch(spec, local))
        window.append(metrics)  # device arrays: fetched (one sync) only when the window is logged
        window_flops += step_flops(frozen_rows)
        window_tokens += int(local["attention_mask"].sum()) * jax.process_count()
        done = step + 1
        writer.advance()
        if done % config.train.log_every == 0 or done == total_steps:
            fetched = jax.device_get(window)
            elapsed = time.time() - window_start
            # Means over the window (single-step contrastive losses are noisy); the schedule's current value.
            last = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]}
            last["learning_rate"] = float(fetched[-1]["learning_rate"])
            last.update(tokens_per_s=window_tokens / elapsed, step_time_s=elapsed / len(fetched),
                        mfu=window_flops / elapsed / peak)
            if cache:
                last["cache_hit_rate"] = cache.hit_rate()
            writer.write(done, last)
            window_start, window_flops, window_tokens, window = time.time(), 0.0, 0, []
        if config.train.eval_every and done % config.train.eval_every == 0 and done != total_steps:
            writer.write(done, validate(config, spec, state, eval_fn, cache, llama_cfg), prefix="val")
        if done % config.train.checkpoint_every == 0 and done != total_steps:
            save_checkpoint(manager, state, config, total_steps)
            if cache and primary:
                cache.save()  # appends the new sequences only
    if int(state.step) > start_step or manager.latest_step() != int(state.step):
        save_checkpoint(manager, state, config, total_steps, force=True)
    manager.wait_until_finished()
    if cache and primary:
        cache.save()
    if config.train.eval_batches > 0 and not config.train.synthetic_data:
        last.update({f"val_{k}": v for k, v in validate(config, spec, state, eval_fn, cache, llama_cfg).items()})
        writer.write(int(state.step), {k[4:]: v for k, v in last.items() if k.startswith("val_")}, prefix="val")
    if not config.train.synthetic_data:
        export_params(config, state, llama_cfg, tokenizer_path(config))
    writer.close()
    return last


def validate(config: Config, spec: StateSpec, state: TrainState, eval_fn, cache, llama_cfg) -> dict[str, float]:
    """Mean loss/accuracy over the first `train.eval_batches` batches of the validation pairs."""
    totals: dict[str, float] = {}
    data = batches(config, llama_cfg, "val", 0)
    for _ in range(config.train.eval_batches):
        local = next(data)
        if cache:
            local = cache(state.frozen, local)
        for k, v in jax.device_get(eval_fn(state, to_global_batch(spec, local))).items():
            totals[k] = totals.get(k, 0.0) + float(v) / config.train.eval_batches
    return totals


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_args(parser)
    args = parser.parse_args(argv)
    notellm_jax.configure_logging()
    return train(config_from_args(args))


if __name__ == "__main__":
    main()
