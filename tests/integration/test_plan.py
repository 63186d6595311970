"""The LLaMA-2-7B NoteLLM step compiles ahead of time on 8 fake devices with abstract parameters, and the
memory XLA assigns to the sharded state matches an independent count of parameters x bytes / devices."""
from pathlib import Path

import jax
import pytest

from notellm_jax.config import load_config
from notellm_jax.plan import plan

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "llama2_7b.py") + ":aot"


@pytest.mark.slow
def test_llama2_7b_step_compiles_with_abstract_params_on_8_devices():
    assert jax.device_count() == 8
    config = load_config(CONFIG, ["model.remat_policy=full"])
    result = plan(config)
    # LLaMA-2-7B with [EMB]: 32001 x 4096 embedding + untied head + 32 layers, counted by hand.
    h, m, v, layers = 4096, 11008, 32001, 32
    params = 2 * v * h + layers * (4 * h * h + 3 * h * m + 2 * h) + h + h * 128 + 1  # + projection + tau
    assert abs(result["params_b"] * 1e9 - (params - h * 128 - 1)) < 1e3
    # fp32 parameters + two fp32 AdamW moments, fully sharded over 8 devices: 12 bytes per parameter / 8.
    expected_gib = 12 * params / 8 / 1024 ** 3
    assert result["argument_gib"] == pytest.approx(expected_gib, rel=0.01)
    assert 0 < result["temp_gib"] < 40
    assert result["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
