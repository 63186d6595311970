"""Orbax checkpoints of the train state (periodic, async, keep-n, resume onto any mesh) and the export.

A checkpoint holds {state, meta}; meta carries the data position, which equals the step because the input
pipeline is deterministic in (seed, step).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

from notellm_jax.config import Config
from notellm_jax.distributed import is_primary
from notellm_jax.errors import CheckpointError
from notellm_jax.model.families import LlamaConfig
from notellm_jax.train.step import TrainSetup, TrainState, check_against_abstract, merged_params
from notellm_jax.weights.export import save_notellm

logger = logging.getLogger(__name__)


def checkpoint_dir(config: Config):
    """`train.checkpoint_dir` (a local path or an orbax URL like gs://...) or <work_dir>/checkpoints."""
    from etils import epath  # orbax: only where checkpoints are read or written
    if "://" in config.train.checkpoint_dir:
        return epath.Path(config.train.checkpoint_dir)
    return Path(config.train.checkpoint_dir or config.work_dir / "checkpoints").absolute()


def checkpoint_manager(config: Config):
    import orbax.checkpoint as ocp  # orbax: only where checkpoints are read or written
    options = ocp.CheckpointManagerOptions(max_to_keep=config.train.keep_checkpoints,
                                           enable_async_checkpointing=config.train.async_checkpoint)
    return ocp.CheckpointManager(checkpoint_dir(config), options=options, item_names=("state", "meta"))


def save_checkpoint(manager, state: TrainState, config: Config, total_steps: int, force: bool = False) -> None:
    import orbax.checkpoint as ocp  # orbax: only where checkpoints are read or written
    step = int(state.step)
    meta = {"step": step, "seed": config.train.seed, "data_position": step, "total_steps": total_steps,
            "config": config.to_dict()}
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                 force=force)


def report_committed(manager, config: Config, pending: list[int]) -> list[int]:
    """Report the saves orbax has committed (an async save is complete only once its thread has finished
    and the step folder is finalised); returns the steps still in flight."""
    if not pending or manager.is_saving_in_progress():
        return pending
    manager.check_for_errors()
    for step in pending:
        logger.info("checkpoint step %d committed: %s", step, checkpoint_dir(config) / str(step))
    return []


def _restore_step(manager, step: int, setup: TrainSetup) -> tuple[TrainState, dict]:
    """(state, meta) of one checkpoint step, validated: the meta names this step, the state is finite."""
    import orbax.checkpoint as ocp  # orbax: only where checkpoints are read or written
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(setup.abstract_state),
                                                             meta=ocp.args.JsonRestore()))
    meta, state = restored["meta"], restored["state"]
    if not isinstance(meta, dict) or meta.get("step") != step or int(state.step) != step:
        raise ValueError(f"metadata {str(meta)[:200]} / state step {int(state.step)} do not describe step {step}")
    leaves = jax.tree.leaves((state.params, state.opt_state))
    if not all(bool(jnp.all(jnp.isfinite(x))) for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)):
        raise ValueError("the restored state holds non-finite values")
    return state, meta


def _set_aside(manager, config: Config, step: int) -> None:
    """Rename a damaged step folder to <step>.damaged (kept for inspection, no longer a step to orbax)."""
    if is_primary():
        folder = checkpoint_dir(config) / str(step)
        target = folder.parent / f"{step}.damaged"
        if target.exists():
            target = folder.parent / f"{step}.damaged.{int(time.time())}"
        folder.rename(target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    manager.reload()


def _newest_restorable(manager, setup: TrainSetup, config: Config) -> tuple[TrainState, dict] | None:
    """Try the steps newest first; a damaged one is logged (step, path, cause) and set aside, or with
    train.on_bad_checkpoint=stop raised as a CheckpointError."""
    steps = sorted(manager.all_steps(), reverse=True)
    for step in steps:
        path = checkpoint_dir(config) / str(step)
        try:
            return _restore_step(manager, step, setup)
        except Exception as e:  # noqa: BLE001 (orbax/TensorStore raise many types for damaged files)
            cause = f"{type(e).__name__}: {str(e)[:500]}"
            if config.train.on_bad_checkpoint == "stop":
                raise CheckpointError(f"{path}: checkpoint step {step} cannot be restored ({cause}); "
                                      "train.on_bad_checkpoint=stop") from e
            logger.warning("checkpoint step %d at %s cannot be restored (%s); set aside as %s.damaged, trying the "
                           "previous one", step, path, cause, step)
            _set_aside(manager, config, step)
    if steps:
        raise CheckpointError(f"{checkpoint_dir(config)}: none of the checkpoint steps {steps} can be restored "
                              "(see the warnings above); move the folder away to start afresh")
    return None


def restore_checkpoint(manager, setup: TrainSetup, config: Config, total_steps: int) -> TrainState | None:
    """The newest restorable checkpoint on this run's mesh (any mesh shape), or None when there is none.

    A step that cannot be restored (a truncated data file, cut metadata, another model's shapes,
    non-finite values) is logged with its path and cause; with train.on_bad_checkpoint="fallback" it is
    set aside and the next older step is tried, with "stop" it is a CheckpointError."""
    latest = manager.latest_step()
    found = _newest_restorable(manager, setup, config)
    if found is None:
        return None
    state, meta = found
    step = int(state.step)
    if step != latest:
        logger.warning("resuming from checkpoint step %d (newer steps were damaged)", step)
    if meta["seed"] != config.train.seed:
        raise ValueError(f"checkpoint at step {step} was trained with seed {meta['seed']}, this run has "
                         f"seed {config.train.seed}: resuming would not reproduce the data order")
    if meta.get("total_steps", total_steps) != total_steps:
        logger.warning("resuming a run planned for %d steps with %d steps: the learning-rate schedule changes, "
                       "so the result will differ from an uninterrupted run", meta["total_steps"], total_steps)
    check_against_abstract(state, setup.abstract_state)
    return state


def write_export(config: Config, setup: TrainSetup, state: TrainState, llama_cfg: LlamaConfig) -> Path:
    """Param-only export for the embedding / eval tools: orbax params + notellm.json. Called by every
    process; each writes its own shards of the sharded parameters (no gather)."""
    params = merged_params(setup, state)  # LoRA merged into the weights
    return save_notellm(config.work_dir / "export", params, llama_cfg, config)


