"""The NoteLLM trainer: `train(config)` = set up, loop, finish.

One jitted step (explicit in/out shardings, donated state) computes the [EMB] projection and both losses
(GCL + CSFT) on the global batch laid out over a (data, fsdp, tensor) mesh. State is created abstractly
and born sharded; batches become global arrays with `jax.make_array_from_process_local_data`; Orbax
saves {state, data position} periodically and the run resumes from (seed, step).

With `model.train_top_layers = k` only the top k decoder layers (plus final norm, projection and logit
scale) train; the frozen bottom's hidden states depend on the token ids alone, so they are computed once
per distinct sequence and cached on the host (`FeatureCache`), which makes CPU fine-tuning practical.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from typing import Any

import jax

from notellm_jax import sharding as shd
from notellm_jax.config import Config, override
from notellm_jax.data.input_pipeline import batches, total_train_steps
from notellm_jax.data.shards import read_shards_meta
from notellm_jax.distributed import is_primary
from notellm_jax.model.families import LlamaConfig
from notellm_jax.errors import TrainingDivergedError
from notellm_jax.train.checkpointing import (checkpoint_dir, checkpoint_manager, write_export, report_committed,
                                             restore_checkpoint, save_checkpoint)
from notellm_jax.infer.feature_cache import FeatureCache, cache_path
from notellm_jax.train.guard import TrainingGuard
from notellm_jax.train.metrics import MetricsWindow, MetricsWriter, StepFlops
from notellm_jax.train.step import (TrainSetup, TrainState, compile_steps, create_state, make_train_setup,
                                    to_global_batch)
from notellm_jax.weights.loading import open_initial_params
from notellm_jax.weights.tokenizer import resolve_tokenizer

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
    """Everything a training run holds between setup and finish."""
    config: Config
    llama_cfg: LlamaConfig
    setup: TrainSetup
    state: TrainState
    manager: Any
    step_fn: Any
    eval_fn: Any
    cache: FeatureCache | None
    writer: MetricsWriter
    total_steps: int
    start_step: int
    guard: TrainingGuard
    saving: list[int] = dataclasses.field(default_factory=list)  # checkpoint steps not yet reported committed


def _feature_cache(config: Config, setup: TrainSetup, state: TrainState) -> FeatureCache | None:
    if not (setup.frozen_layers > 0 and config.model.cache_frozen_features):
        return None
    if jax.process_count() > 1:
        raise ValueError("model.cache_frozen_features works in one process; set it False for multi-host runs")
    path = (cache_path(config.data_dir, config.model.checkpoint, setup.frozen_layers, state.frozen)
            if config.model.persist_feature_cache else None)
    return FeatureCache(setup.model, setup.mesh, setup.frozen_layers, path=path,
                        max_bytes=config.model.feature_cache_max_gb * 1e9)


def _announce(run: Run) -> None:
    config, state = run.config, run.state
    config.work_dir.mkdir(parents=True, exist_ok=True)
    (config.work_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    n_train = sum(x.size for x in jax.tree.leaves(state.params))
    n_all = n_train + sum(x.size for x in jax.tree.leaves(state.frozen))
    logger.info("%s: %.1fM parameters (%.1fM trained), mesh %s, steps %d->%d, %d notes x %d tokens per step",
                config.name, n_all / 1e6, n_train / 1e6, dict(run.setup.mesh.shape), run.start_step,
                run.total_steps, 2 * config.train.batch_pairs, config.prompt.max_length)


def _vocab_size(config: Config) -> int:
    """The tokenizer's vocabulary with [EMB]; for numpy input the one the shards were written with (such a
    host may lack the tokenizer's reader, e.g. the gguf package)."""
    if config.data.train_input == "numpy":
        return read_shards_meta(config, config.data_dir)["vocab_size"]
    return resolve_tokenizer(config).vocab_size


def setup(config: Config) -> Run:
    """Mesh, sharded state (restored if a checkpoint exists, else from the initial weights, which a resumed run
    never reads), compiled steps, cache and writer."""
    config.validate(jax.device_count(), jax.process_count(), training=True)
    total_steps = total_train_steps(config)  # first: prepared data that cannot give one batch is refused early
    mesh = shd.mesh_from_config(config.mesh)
    emb_vocab = None if config.train.synthetic_data else _vocab_size(config)
    initial = open_initial_params(config, emb_vocab, mesh)  # headers only: the config and the shapes
    llama_cfg = initial.llama_cfg
    train_setup = make_train_setup(config, llama_cfg, mesh, total_steps)
    manager = checkpoint_manager(config)
    # A checkpoint is looked for first: a resumed run never reads the initial weights.
    state = restore_checkpoint(manager, train_setup, config, total_steps)
    if state is None:
        state = create_state(train_setup, initial.read())
    step_fn, eval_fn = compile_steps(train_setup)
    start_step = int(state.step)
    writer = MetricsWriter(config.work_dir / "logs", total_steps, enabled=is_primary(), start_step=start_step)
    run = Run(config, llama_cfg, train_setup, state, manager, step_fn, eval_fn,
              _feature_cache(config, train_setup, state), writer, total_steps, start_step,
              TrainingGuard(config.train))
    if is_primary():
        _announce(run)
    return run


def _with_frozen_features(run: Run, local: dict) -> tuple[dict, int]:
    """The batch with the frozen bottom's output filled in, and how many rows the bottom ran on."""
    if run.cache is None:
        return local, (len(local["input_ids"]) if run.setup.frozen_layers else 0)
    misses_before = run.cache.misses
    local = run.cache(run.state.frozen, local)
    return local, run.cache.misses - misses_before


def train_loop(run: Run) -> dict[str, Any]:
    """Steps from the resumed position to the end; periodic logging, validation and checkpoints. Every
    step's loss, gradient norm and logit scale are checked (TrainingGuard) before anything is logged or saved."""
    config, train_cfg = run.config, run.config.train
    flops = StepFlops(run.llama_cfg, config, run.setup.frozen_layers)
    window = MetricsWindow(flops)
    data = batches(config, run.llama_cfg, "train", run.start_step)
    last: dict[str, Any] = {}
    for step in range(run.start_step, run.total_steps):
        local, frozen_rows = _with_frozen_features(run, next(data))
        run.state, metrics = run.step_fn(run.state, to_global_batch(run.setup, local))
        done = step + 1
        run.guard.add(done, metrics)
        window.add(done, metrics, local, frozen_rows)
        run.writer.advance()
        if done % train_cfg.log_every == 0 or done == run.total_steps:
            last = window.flush(run.guard.check())
            if run.cache:
                last["cache_hit_rate"] = run.cache.hit_rate()
            run.writer.write(done, last)
        if done == run.total_steps:
            break
        if train_cfg.eval_every and done % train_cfg.eval_every == 0:
            run.writer.write(done, validate(run), prefix="val")
        if done % train_cfg.checkpoint_every == 0:
            run.guard.check()
            save_checkpoint(run.manager, run.state, config, run.total_steps)
            run.saving.append(done)
            if run.cache and is_primary():
                run.cache.save()  # appends the sequences added since the last save
        run.saving = report_committed(run.manager, config, run.saving)
    run.guard.check()
    return last


def _stop_diverged(run: Run, error: TrainingDivergedError) -> TrainingDivergedError:
    """The error to raise once a run diverged: saves in flight (of earlier, checked steps) are committed
    first, and the message says which checkpoint is the last good one: after an anomaly the newest saved
    before the parameters the first anomalous step measured (`TrainingGuard.last_good_step`), not the
    newest saved. Nothing is exported."""
    run.manager.wait_until_finished()
    run.writer.close()
    saved, limit = sorted(run.manager.all_steps()), run.guard.last_good_step
    good = [s for s in saved if limit is None or s <= limit]
    where = f"step {good[-1]} in {checkpoint_dir(run.config)}" if good else "none"
    if limit is not None:  # step s measured the parameters step s-1 produced: checkpoint s-1 is not good
        first = run.guard.first_anomaly
        source = f"the parameters step {first - 1} produced" if first > 1 else "the initial parameters"
        later = [s for s in saved if s > limit]
        where += (f" (the first anomaly, at step {first}, measured {source}"
                  + (f"; not good: checkpoint(s) {later}" if later else "") + ")")
    return TrainingDivergedError(f"{error}. Last good checkpoint: {where}; no export written")


def finish(run: Run, last: dict[str, Any]) -> dict[str, Any]:
    """Final checkpoint, final validation, feature-cache save and the export."""
    config, state = run.config, run.state
    if int(state.step) > run.start_step or run.manager.latest_step() != int(state.step):
        save_checkpoint(run.manager, state, config, run.total_steps, force=True)
        run.saving.append(int(state.step))
    run.manager.wait_until_finished()
    report_committed(run.manager, config, run.saving)
    if config.train.eval_batches > 0 and not config.train.synthetic_data:
        val = validate(run)
        run.writer.write(int(state.step), val, prefix="val")
        last = {**last, **{f"val_{k}": v for k, v in val.items()}}
    if run.cache and is_primary():
        run.cache.save()  # after validation, so that later runs reuse the validation notes' features too
    if not config.train.synthetic_data:
        write_export(config, run.setup, state, run.llama_cfg)
    run.writer.close()
    return last


def validate(run: Run) -> dict[str, float]:
    """Mean loss/accuracy over the first `train.eval_batches` batches of the validation pairs, each of
    `train.eval_batch_pairs` pairs (default: the training batch)."""
    config = run.config
    n = config.train.eval_batches
    if config.train.eval_batch_pairs:
        config = override(config, {"train.batch_pairs": config.train.eval_batch_pairs})
    totals: dict[str, float] = {}
    data = batches(config, run.llama_cfg, "val", 0)
    for _ in range(n):
        local, _ = _with_frozen_features(run, next(data))
        for k, v in jax.device_get(run.eval_fn(run.state, to_global_batch(run.setup, local))).items():
            totals[k] = totals.get(k, 0.0) + float(v) / n
    return totals


def train(config: Config) -> dict[str, Any]:
    """Run (or resume) training; returns the last logged metrics (window means, plus val_* at the end).
    A run that diverges raises TrainingDivergedError (step and quantity named, no export)."""
    run = setup(config)
    try:
        last = train_loop(run)
    except TrainingDivergedError as e:
        raise _stop_diverged(run, e) from None
    return finish(run, last)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options beyond --config and --set: the config says everything about a run."""


def run(args, config: Config) -> dict[str, Any]:
    """`notellm train` / `python -m notellm_jax.train`."""
    return train(config)
