"""AdamW with warmup + linear/cosine decay, global-norm clipping and a weight-decay mask."""
from __future__ import annotations

import jax
import optax

from notellm_jax.config import TrainConfig


def make_schedule(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup over `warmup_fraction` of the steps, then linear or cosine decay to 0 (METHOD.md 4)."""
    warmup = max(1, int(round(cfg.warmup_fraction * total_steps))) if cfg.warmup_fraction > 0 else 0
    decay_steps = max(1, total_steps - warmup)
    if cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.learning_rate, 0.0, decay_steps)
    elif cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps)
    else:
        raise ValueError(f"train.schedule must be 'linear' or 'cosine', got {cfg.schedule!r}")
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup), decay], [warmup])


def decay_mask(params):
    """Weight decay on matrices only: not on norm scales, the temperature or other vectors/scalars."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: TrainConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(cfg, total_steps)
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.adamw(schedule, b1=cfg.adam_b1, b2=cfg.adam_b2, weight_decay=cfg.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts), schedule
