"""The training guard: a step that is non-finite, diverged or collapsed never passes as training.

The step itself discards a non-finite update (`step.train_step`); `TrainingGuard` counts those steps from
the per-step metrics (fetched in batches, so steps still dispatch ahead of the host), logs each, and raises
`TrainingDivergedError` once more than `train.max_nonfinite_steps` were discarded. A finite step can still
show a run gone wrong, and the guard stops at the first such anomaly (each rule `train.*`, 0 = off):
- loss spike: the loss above `loss_spike_factor` x the median of the last `loss_window` finite losses
  (once `loss_warmup_steps` were seen);
- logit scale: |log logit scale| above `max_abs_log_logit_scale` (the temperature ran away);
- gradient norm above `max_grad_norm`, or exactly 0 for `max_zero_grad_steps` steps in a row (collapsed:
  nothing learns any more; the first step of the streak is the anomaly).
Step s's metrics measure the parameters that step s-1 produced (checkpoint s-1), so after the first anomaly
at step s (`first_anomaly`) the newest good checkpoint is step s-2 or older (`last_good_step`). The loop calls `check()` before it
logs, saves a checkpoint or exports, so nothing after the failing step is kept.
"""
from __future__ import annotations

import collections
import logging
from typing import Any

import jax
import numpy as np

from notellm_jax.config import TrainConfig
from notellm_jax.errors import TrainingDivergedError

logger = logging.getLogger(__name__)

WATCHED = ("loss", "grad_norm", "log_logit_scale")  # the step's metrics the guard reads


class TrainingGuard:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.discarded: list[int] = []
        self.first_anomaly: int | None = None  # the first step whose metrics broke a rule
        self._pending: list[tuple[int, Any]] = []
        self._losses: collections.deque[float] = collections.deque(maxlen=cfg.loss_window)
        self._losses_seen = 0
        self._zero_grad_since: int | None = None

    def add(self, step: int, metrics: dict) -> None:
        """Record step `step` (1-based, as logged); its metrics stay on the device until `check()`."""
        self._pending.append((step, {k: metrics[k] for k in WATCHED if k in metrics}))

    def check(self) -> set[int]:
        """The steps found non-finite since the last check; raises past the allowance or at an anomaly."""
        bad = set()
        pending, self._pending = self._pending, []
        for step, values in jax.device_get(pending):
            values = {k: float(v) for k, v in values.items()}
            if self._nonfinite(step, values):
                bad.add(step)
                continue
            anomaly = self._anomaly(step, values)
            if anomaly is not None:
                self.first_anomaly, what = anomaly
                raise TrainingDivergedError(f"step {step}: {what}")
        return bad

    @property
    def last_good_step(self) -> int | None:
        """Checkpoints up to this step are good; None: every one saved so far (no anomaly seen)."""
        return None if self.first_anomaly is None else self.first_anomaly - 2

    def _nonfinite(self, step: int, values: dict[str, float]) -> bool:
        what = " and ".join(f"{name} {values[key]}" for key, name in (("loss", "loss"), ("grad_norm", "gradient norm"))
                            if not np.isfinite(values[key]))
        if not what:
            return False
        self._zero_grad_since = None
        self.discarded.append(step)
        if len(self.discarded) > self.cfg.max_nonfinite_steps:
            raise TrainingDivergedError(
                f"step {step}: non-finite {what}; stopping after {len(self.discarded)} non-finite step(s) "
                f"(train.max_nonfinite_steps={self.cfg.max_nonfinite_steps}; discarded: {self.discarded})")
        logger.warning("step %d: non-finite %s, update discarded (%d of %d allowed)", step, what,
                       len(self.discarded), self.cfg.max_nonfinite_steps)
        return True

    def _anomaly(self, step: int, values: dict[str, float]) -> tuple[int, str] | None:
        """(first anomalous step, what) for a finite step that breaks a rule, else None (the step is history)."""
        cfg, loss, grad_norm = self.cfg, values["loss"], values["grad_norm"]
        if cfg.loss_spike_factor and self._losses_seen >= max(cfg.loss_warmup_steps, 1):
            median = float(np.median(self._losses))
            if loss > cfg.loss_spike_factor * median:
                return step, (f"loss {loss:.6g} is {loss / median:.3g} x the median {median:.6g} of the last "
                              f"{len(self._losses)} steps (train.loss_spike_factor={cfg.loss_spike_factor:g})")
        scale = values.get("log_logit_scale")
        if cfg.max_abs_log_logit_scale and scale is not None and abs(scale) > cfg.max_abs_log_logit_scale:
            return step, (f"log logit scale {scale:.6g} is beyond +-{cfg.max_abs_log_logit_scale:g} "
                          "(train.max_abs_log_logit_scale)")
        if cfg.max_grad_norm and grad_norm > cfg.max_grad_norm:
            return step, f"gradient norm {grad_norm:.6g} > {cfg.max_grad_norm:g} (train.max_grad_norm)"
        self._zero_grad_since = (self._zero_grad_since or step) if grad_norm == 0 else None
        if cfg.max_zero_grad_steps and self._zero_grad_since is not None \
                and step - self._zero_grad_since + 1 >= cfg.max_zero_grad_steps:
            return self._zero_grad_since, (f"gradient norm 0 in {step - self._zero_grad_since + 1} consecutive "
                                           f"steps ({self._zero_grad_since}-{step}; train.max_zero_grad_steps="
                                           f"{cfg.max_zero_grad_steps})")
        self._losses.append(loss)
        self._losses_seen += 1
        return None
