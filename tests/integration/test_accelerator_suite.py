"""bench/accelerator_suite.sh in its small CPU mode: one command writes the JSON the GPU run would, with
JAX's and PyTorch's first-step losses equal on the same weights and batch (fp32 here), every attention
implementation's step and share, and MFU figures consistent with their own step times."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_small_suite_writes_the_accelerator_json(tmp_path):
    out = tmp_path / "suite.json"
    env = {**os.environ, "OUT": str(out), "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHON": sys.executable}
    run = subprocess.run(["bash", "bench/accelerator_suite.sh", "--small", "--steps", "1"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["small"] and result["backend"] == "cpu"
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in result["xla_flags"]  # MaxText's set, tolerated on CPU
    for part in ("smollm2", "llama2_7b"):
        assert sorted(result[part]) == ["dot_product", "einsum"]  # splash only on TPU
    smollm2 = result["smollm2"]
    reference = smollm2["einsum"]
    # Same random weights and batch: the two frameworks' (and the two attention cores') first losses agree.
    assert reference["torch"]["first_step_loss"] == pytest.approx(reference["jax"]["first_step_loss"], rel=1e-4)
    assert smollm2["dot_product"]["jax"]["first_step_loss"] == pytest.approx(reference["jax"]["first_step_loss"],
                                                                             rel=1e-5)
    for impl in ("einsum", "dot_product"):
        for row in (smollm2[impl]["jax"], result["llama2_7b"][impl]):
            assert row["mfu"] == pytest.approx(row["achieved_tflop_s"] * 1e12 / 2.0e11, rel=1e-6)  # CPU peak
            assert row["tokens_per_s"] == pytest.approx(8 * 32 / row["step_s"])
        for share in (smollm2[impl]["attention_share"], result["llama2_7b"][impl]["attention_share"]):
            assert 0 < share["share_of_step"] < 1
    assert result["llama2_7b"]["einsum"]["layers"] == 2
