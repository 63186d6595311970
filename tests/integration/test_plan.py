"""The LLaMA-2-7B NoteLLM step compiles ahead of time on 8 fake devices with abstract parameters, with the
shipped remat policy, on a 2-layer model at 7B width (embedding, head and per-layer shapes are the real
ones; the full depth only repeats the layer): the memory XLA assigns to the sharded state matches an
independent count of parameters x bytes / devices, and the shipped policy (which saves the weight matmuls'
outputs) needs more temporary memory than full rematerialisation, i.e. the policy reaches the program."""
from pathlib import Path

import jax
import pytest

from notellm_jax.config import load_config
from notellm_jax.tools.plan import plan

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "paper_7b.py") + ":llama2_7b,aot"
LAYERS = 2


@pytest.mark.slow
def test_llama2_7b_step_compiles_with_the_shipped_remat_policy_on_8_devices():
    assert jax.device_count() == 8
    config = load_config(CONFIG)
    shipped = plan(config, num_layers=LAYERS)
    assert shipped["remat_policy"] == config.model.remat_policy == "dots_with_no_batch_dims_saveable"
    assert shipped["compute_dtype"] == "bfloat16" and shipped["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    # LLaMA-2-7B widths with [EMB]: 32001 x 4096 embedding + untied head + 2 layers, counted by hand.
    h, m, v = 4096, 11008, 32001
    params = 2 * v * h + LAYERS * (4 * h * h + 3 * h * m + 2 * h) + h + h * 128 + 1  # + projection + tau
    assert abs(shipped["params_b"] * 1e9 - (params - h * 128 - 1)) < 1e3
    # fp32 parameters + two fp32 AdamW moments, fully sharded over 8 devices: 12 bytes per parameter / 8.
    assert shipped["argument_gib"] == pytest.approx(12 * params / 8 / 1024 ** 3, rel=0.01)
    full = plan(load_config(CONFIG, ["model.remat_policy=full"]), num_layers=LAYERS)
    assert full["argument_gib"] == pytest.approx(shipped["argument_gib"])
    assert shipped["temp_gib"] > full["temp_gib"]
