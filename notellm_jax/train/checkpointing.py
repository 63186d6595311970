"""Orbax checkpoints of the train state (periodic, async, keep-n, resume onto any mesh) and the export.

A checkpoint holds {state, meta}; meta carries the data position, which equals the step because the input
pipeline is deterministic in (seed, step).
"""
from __future__ import annotations

import logging
from pathlib import Path

from notellm_jax.config import Config
from notellm_jax.model.llama import LlamaConfig
from notellm_jax.model.params import merge_params
from notellm_jax.train.step import TrainSetup, TrainState

logger = logging.getLogger(__name__)


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


def restore_checkpoint(manager, setup: TrainSetup, config: Config, total_steps: int) -> TrainState | None:
    """The latest checkpoint restored onto this run's mesh (any mesh shape), or None."""
    import orbax.checkpoint as ocp
    step = manager.latest_step()
    if step is None:
        return None
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(setup.abstract_state),
                                                             meta=ocp.args.JsonRestore()))
    meta = restored["meta"]
    if meta["seed"] != config.train.seed:
        raise ValueError(f"checkpoint at step {step} was trained with seed {meta['seed']}, this run has "
                         f"seed {config.train.seed}: resuming would not reproduce the data order")
    if meta.get("total_steps", total_steps) != total_steps:
        logger.warning("resuming a run planned for %d steps with %d steps: the learning-rate schedule changes, "
                       "so the result will differ from an uninterrupted run", meta["total_steps"], total_steps)
    return restored["state"]


def export_params(config: Config, state: TrainState, llama_cfg: LlamaConfig) -> Path:
    """Param-only export for the embedding / eval tools: orbax params + notellm.json. Called by every
    process; each writes its own shards of the sharded parameters (no gather)."""
    from notellm_jax.weights.export import save_notellm
    params = merge_params(state.params, state.frozen)
    return save_notellm(config.work_dir / "export", params, llama_cfg, config)


