"""The training guard's rules (train/guard.py) on hand-built per-step metrics: non-finite steps, the loss
against its running median, the logit scale and gradient norm bounds, the zero-gradient streak, and no
false alarm on healthy curves."""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from notellm_jax.config import TrainConfig
from notellm_jax.errors import TrainingDivergedError
from notellm_jax.train.guard import TrainingGuard

# configs/tiny.py (stories260K, lr 2e-3, 96 steps), logged every step: loss and gradient norm per step; its
# log logit scale stayed in [2.9947, 3.0029].
TINY_LOSS = [2.741, 2.813, 2.765, 2.793, 2.764, 2.761, 2.739, 2.704, 2.585, 2.673, 2.615, 3.054, 2.779, 2.708,
             2.742, 2.73, 2.7, 2.632, 2.751, 2.975, 2.728, 2.721, 2.7, 2.687, 2.725, 2.659, 2.744, 2.632, 2.58,
             2.734, 2.705, 2.672, 2.303, 2.503, 2.607, 2.976, 2.684, 2.752, 2.701, 2.451, 2.459, 2.307, 2.715,
             2.189, 2.258, 2.549, 2.344, 2.734, 2.526, 2.863, 2.159, 2.56, 2.508, 2.363, 2.346, 2.551, 2.211,
             1.864, 1.91, 2.367, 2.767, 2.565, 2.589, 1.624, 1.861, 1.967, 2.42, 4.056, 2.501, 1.867, 2.353,
             1.853, 1.912, 2.46, 2.563, 1.719, 1.89, 1.666, 2.867, 1.582, 2.087, 2.078, 1.38, 1.834, 1.538, 1.491,
             2.097, 1.851, 1.243, 1.622, 1.542, 2.369, 1.148, 2.101, 1.192, 1.519]
TINY_GRAD = [3.24, 6.18, 2.78, 2.05, 1.75, 1.46, 0.34, 1.09, 2.02, 6.26, 6.17, 14.89, 6.28, 0.66, 1.19, 0.78, 1.13,
             4.0, 3.92, 6.41, 2.04, 1.01, 0.68, 0.58, 0.94, 1.95, 1.5, 2.38, 1.67, 1.65, 0.89, 5.57, 4.52, 3.99,
             2.52, 9.26, 4.69, 4.45, 2.25, 3.74, 4.16, 4.78, 12.68, 5.56, 9.18, 9.28, 9.71, 7.24, 4.14, 16.8, 6.88,
             4.1, 15.09, 10.28, 6.39, 4.51, 7.66, 10.57, 9.39, 31.26, 31.55, 23.27, 32.09, 18.49, 15.08, 25.37,
             24.31, 43.79, 22.43, 18.46, 14.99, 9.68, 9.63, 7.61, 13.03, 10.14, 7.34, 6.04, 18.0, 9.39, 13.79,
             10.97, 6.71, 9.2, 12.3, 8.1, 21.76, 20.32, 8.1, 9.44, 17.13, 20.1, 9.32, 16.16, 10.23, 18.11]


def metrics(loss: float, grad_norm: float = 1.0, log_logit_scale: float = 3.0) -> dict:
    """One step's metrics as the jitted step returns them (0-d float32 arrays), plus ones the guard ignores."""
    return {"loss": np.float32(loss), "grad_norm": np.float32(grad_norm),
            "log_logit_scale": np.float32(log_logit_scale), "accuracy": np.float32(0.5)}


def feed(guard: TrainingGuard, steps: list[dict], check_every: int = 4, start: int = 1) -> set[int]:
    """Add the steps as the loop does (1-based) and check every few, as logging does; the discarded steps."""
    bad: set[int] = set()
    for i, m in enumerate(steps, start):
        guard.add(i, m)
        if i % check_every == 0:
            bad |= guard.check()
    return bad | guard.check()


def stops(guard: TrainingGuard, steps: list[dict]) -> str:
    with pytest.raises(TrainingDivergedError) as info:
        feed(guard, steps)
    assert info.value.exit_code == 3
    return str(info.value)


def guard(**rules) -> TrainingGuard:
    return TrainingGuard(dataclasses.replace(TrainConfig(), **rules))


def test_no_false_alarm_on_the_tiny_runs_curve():
    g = guard()
    assert feed(g, [metrics(loss, grad, 3.0 - 0.005 * (i % 2)) for i, (loss, grad) in
                    enumerate(zip(TINY_LOSS, TINY_GRAD, strict=True))]) == set()
    assert g.first_anomaly is None and g.last_good_step is None


def test_no_false_alarm_on_a_noisy_curve_falling_to_a_small_loss():
    """A csft_only-like curve (5 down to 0.07, as the smollm2_se long run's) with per-step noise of x/÷ 2."""
    rng = np.random.default_rng(0)
    steps = 600
    curve = 0.07 + 5.0 * np.exp(-np.arange(steps) / 40)
    noise = np.exp(rng.uniform(-np.log(2), np.log(2), steps))
    grads = 20 * np.exp(rng.normal(0, 0.7, steps))
    g = guard()
    assert feed(g, [metrics(float(l), float(n)) for l, n in zip(curve * noise, grads)]) == set()
    assert g.first_anomaly is None


def test_a_loss_spike_against_the_running_median():
    healthy = [metrics(2.0 + 0.1 * (i % 3)) for i in range(30)]  # median 2.1
    message = stops(guard(loss_spike_factor=5.0, loss_window=16, loss_warmup_steps=8), healthy + [metrics(11.0)])
    assert re.fullmatch(r"step 31: loss 11 is 5\.24 x the median 2\.1 of the last 16 steps "
                        r"\(train\.loss_spike_factor=5\)", message), message
    g = guard(loss_spike_factor=5.0, loss_window=16, loss_warmup_steps=8)
    feed(g, healthy + [metrics(10.0)])  # 4.76 x: below the factor
    with pytest.raises(TrainingDivergedError, match="step 32: loss 12"):
        feed(g, [metrics(12.0)], start=32)
    assert (g.first_anomaly, g.last_good_step) == (32, 30)


def test_the_loss_rule_waits_for_its_warmup_and_can_be_off():
    early = [metrics(2.0)] * 5 + [metrics(50.0)]  # step 6: only 5 losses seen, warm-up 16
    assert feed(guard(), early) == set()
    assert feed(guard(loss_spike_factor=0.0), [metrics(2.0)] * 40 + [metrics(1e6)]) == set()


@pytest.mark.parametrize("scale", [-396_799.0, 10.5, -10.01])
def test_the_log_logit_scale_bound(scale):
    steps = [metrics(2.7)] * 2 + [metrics(2.7, 0.0, scale)]
    message = stops(guard(), steps)
    assert message.startswith(f"step 3: log logit scale {scale:.6g} is beyond +-10 (train.max_abs_log_logit_scale)")
    assert feed(guard(max_abs_log_logit_scale=0.0, max_zero_grad_steps=0), steps) == set()


def test_the_gradient_norm_bound():
    message = stops(guard(), [metrics(2.0, 40.0)] * 3 + [metrics(2.0, 2.5e4)])
    assert message == "step 4: gradient norm 25000 > 10000 (train.max_grad_norm)"
    assert feed(guard(max_grad_norm=0.0), [metrics(2.0, 1e30)]) == set()


def test_a_zero_gradient_streak_names_its_first_step():
    g = guard(max_zero_grad_steps=3)
    steps = [metrics(2.0), metrics(2.0, 0.0), metrics(2.0, 0.0), metrics(2.0)]  # a streak of two: broken
    steps += [metrics(2.0), metrics(2.0, 0.0), metrics(2.0, 0.0), metrics(2.0, 0.0)]
    with pytest.raises(TrainingDivergedError) as info:
        feed(g, steps)
    assert str(info.value) == ("step 8: gradient norm 0 in 3 consecutive steps (6-8; "
                               "train.max_zero_grad_steps=3)")
    assert (g.first_anomaly, g.last_good_step) == (6, 4)  # step 6 measured what step 5 produced


def test_a_nonfinite_step_breaks_a_zero_gradient_streak_and_keeps_its_allowance(caplog):
    g = guard(max_nonfinite_steps=1)
    steps = [metrics(2.0), metrics(2.0, 0.0), metrics(float("nan"), float("nan")), metrics(2.0, 0.0)]
    assert feed(g, steps) == {3}
    assert "step 3: non-finite loss nan and gradient norm nan, update discarded (1 of 1 allowed)" in caplog.text
    with pytest.raises(TrainingDivergedError, match=r"^step 5: non-finite gradient norm inf; stopping after 2 "
                                                    r"non-finite step\(s\) \(train.max_nonfinite_steps=1; "
                                                    r"discarded: \[3, 5\]\)$"):
        feed(g, [metrics(2.0, float("inf"))], start=5)
    assert g.first_anomaly is None and g.last_good_step is None  # non-finite updates were discarded


def test_a_nonfinite_loss_is_not_history_for_the_median():
    g = guard(loss_warmup_steps=4, loss_window=4, max_nonfinite_steps=1)
    feed(g, [metrics(2.0)] * 3 + [metrics(float("inf"), 1.0)] + [metrics(2.0)] + [metrics(9.0)])
    with pytest.raises(TrainingDivergedError, match="step 7: loss 10.5 is 5.25 x the median 2 of the last 4"):
        feed(g, [metrics(10.5)], start=7)
