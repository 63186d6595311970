"""The non-finite guard: a step whose loss or gradient norm is NaN/inf never passes as training.

The step itself discards a non-finite update (`step.train_step`); `NonFiniteGuard` counts those steps
from the per-step metrics (fetched in batches, so steps still dispatch ahead of the host), logs each,
and raises `TrainingDivergedError` once more than `train.max_nonfinite_steps` were discarded. The loop
calls `check()` before it logs, saves a checkpoint or exports, so nothing after the failing step is kept.
"""
from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np

from notellm_jax.errors import TrainingDivergedError

logger = logging.getLogger(__name__)


class NonFiniteGuard:
    def __init__(self, allowed: int):
        self.allowed = allowed
        self.discarded: list[int] = []
        self._pending: list[tuple[int, Any]] = []

    def add(self, step: int, metrics: dict) -> None:
        """Record step `step` (1-based, as logged); its metrics stay on the device until `check()`."""
        self._pending.append((step, (metrics["loss"], metrics["grad_norm"])))

    def check(self) -> set[int]:
        """The steps found non-finite since the last check; raises past the allowance."""
        bad = set()
        pending, self._pending = self._pending, []
        for step, (loss, grad_norm) in jax.device_get(pending):
            what = " and ".join(f"{name} {float(v)}" for name, v in (("loss", loss), ("gradient norm", grad_norm))
                                if not np.isfinite(v))
            if not what:
                continue
            bad.add(step)
            self.discarded.append(step)
            if len(self.discarded) > self.allowed:
                raise TrainingDivergedError(
                    f"step {step}: non-finite {what}; stopping after {len(self.discarded)} non-finite step(s) "
                    f"(train.max_nonfinite_steps={self.allowed}; discarded: {self.discarded})")
            logger.warning("step %d: non-finite %s, update discarded (%d of %d allowed)", step, what,
                           len(self.discarded), self.allowed)
        return bad
