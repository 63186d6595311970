"""`notellm plan --target tpu`: the TPU compiler (libtpu) compiles the tiny config's train step for a v5p-8
topology from this CPU host (no TPU, JAX_PLATFORMS=cpu), and the report reads the compiled program right;
the HLO readers are checked on hand-written HLO whose answers are counted by hand."""
import math
import os
import subprocess
import sys

import pytest

from notellm_jax.config import load_config
from notellm_jax.tools import tpu_plan
from notellm_jax.tools.plan import plan_tpu

WHILE_HLO = """HloModule m

%body (p: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {
  %p = (s32[], f32[8,128]) parameter(0)
  %x = f32[8,128]{1,0:T(8,128)} get-tuple-element(%p), index=1
  %k = f32[8,128]{1,0} custom-call(%x), custom_call_target="tpu_custom_call", backend_config="{payload
}, more payload"
  %all-gather-start.1 = (f32[2,128]{1,0}, f32[8,128]{1,0}) all-gather-start(%x), replica_groups=[2,4]<=[4,2]T(1,0), dimensions={0}
  ROOT %t = (s32[], f32[8,128]) tuple(%i, %x)
}

%cond (p.1: (s32[], f32[8,128])) -> pred[] {
  %p.1 = (s32[], f32[8,128]) parameter(0)
  %c = s32[]{:T(128)} constant(32)
  ROOT %lt = pred[]{:T(512)} compare(%g, %c), direction=LT
}

%all-reduce-scatter.3 (input: f32[64,16]) -> f32[16,16] {
  %all-reduce.9 = f32[64,16]{1,0} all-reduce(%input), replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, to_apply=%add
  ROOT %d = f32[16,16]{1,0} dynamic-slice(%all-reduce.9, %z, %z), dynamic_slice_sizes={16,16}
}

ENTRY %main (a: f32[8,128]) -> f32[8,128] {
  %w = (s32[], f32[8,128]) while(%init), condition=%cond, body=%body
  %rs = f32[16,16]{1,0} fusion(%y), kind=kCustom, calls=%all-reduce-scatter.3
  %ar = bf16[4,4]{1,0} all-reduce(%q), replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  %send.1 = (bf16[8,128]{1,0}, u32[], token[]) send(%x, %tok), is_host_transfer=true, frontend_attributes={_xla_megascale_target="{1,2}x{0:3}",_xla_megascale_transfer_type="ALL_REDUCE"}
  ROOT %r = f32[8,128] get-tuple-element(%w), index=1
}
"""


class _Mesh:  # what collectives() reads of a jax Mesh: a (data=2, fsdp=4) device grid in id order
    devices = type("Grid", (), {"shape": (2, 4), "size": 8})()
    axis_names = ("data", "fsdp")


def test_collectives_count_loop_trips_and_name_the_mesh_axes():
    found = tpu_plan.collectives(WHILE_HLO, _Mesh())
    # The gather sits in a 32-trip loop (bound 32, direction LT), after a Mosaic kernel whose payload spans
    # lines (one starts with "}"); iota groups [2,4]<=[4,2]T(1,0) make the first group ids 0,2,4,6 = mesh
    # coordinates (0,0),(0,2),(1,0),(1,2): it spans both axes.
    gather = found["all-gather"]
    assert gather["count"] == 32 and gather["bytes"] == 32 * 8 * 128 * 4
    assert gather["wire_bytes"] == pytest.approx(32 * 8 * 128 * 4 * 3 / 4)
    assert set(gather["by_axes"]) == {"data+fsdp"}
    # An all-reduce in an all-reduce-scatter fusion is a reduce-scatter over axis_1 = ids 0..3 = fsdp.
    assert found["reduce-scatter"]["by_axes"] == {"fsdp": {"count": 1, "bytes": 64 * 16 * 4,
                                                           "wire_bytes": 64 * 16 * 4 * 3 / 4}}
    assert found["all-reduce"]["by_axes"]["data+fsdp"]["wire_bytes"] == pytest.approx(2 * 32 * 7 / 8)
    # Across slices: a send to the Megascale runtime, an all-reduce of 8 x 128 bf16 over 2 slices (DCN).
    assert found["all-reduce"]["by_axes"]["dcn"] == {"count": 1, "bytes": 2048, "wire_bytes": 2048.0}


def test_roofline_takes_the_largest_term_and_sends_the_dcn_axis_over_dcn():
    chip = tpu_plan.Chip(hbm_gib=95, bf16_tflops=100, hbm_gbps=1000, ici_gbps=100, dcn_gbps=10)
    comm = {"all-reduce": {"wire_bytes": 3e9, "by_axes": {"data": {"wire_bytes": 1e9},
                                                          "fsdp": {"wire_bytes": 2e9}}}}
    bound = tpu_plan.roofline(chip, model_flops=1e13, hbm_bytes=5e10, comm=comm, dcn_axis="data")
    assert (bound["compute_s"], bound["hbm_s"], bound["ici_s"], bound["dcn_s"]) == pytest.approx((0.1, 0.05, 0.02, 0.1))
    assert bound["step_s"] == pytest.approx(0.1) and bound["mfu"] == pytest.approx(1.0)
    assert bound["mfu_no_overlap"] == pytest.approx(0.1 / 0.27)


def test_tiny_step_compiled_for_v5p_8_reports_memory_and_the_mesh_collectives():
    if tpu_plan.libtpu_version() is None:
        pytest.skip("libtpu not installed (requirements-dev.txt: jax[tpu]); the CPU-backend plan covers this host")
    config = load_config("configs/tiny.py:random", ["mesh.fsdp=2", "mesh.tensor=2", "prompt.max_length=128",
                                                    "train.batch_pairs=4"])
    result = plan_tpu(config, "v5p-8", num_layers=2)
    assert result["device_kind"].startswith("TPU v5") and result["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    # fp32 parameters + two AdamW moments, split over 4 chips at most (small dims replicate, tiles pad): a floor.
    params = result["params_b"] * 1e9
    assert result["argument_gib"] * 1024 ** 3 >= 12 * params / 4
    assert result["alias_gib"] > 0 and result["fits"] and result["headroom_gib"] < 95
    comm = result["collectives"]
    # fsdp>1: the weights are all-gathered over fsdp; tensor>1: activations reduced over tensor.
    assert comm["all-gather"]["by_axes"]["fsdp"]["bytes"] > 0
    assert any("tensor" in axes.split("+") for kind in comm.values() for axes in kind["by_axes"])
    assert all(set(axes.split("+")) <= {"fsdp", "tensor", "none"} for kind in comm.values() for axes in kind["by_axes"])
    roof = result["roofline"]
    assert roof["step_s"] == max(roof["compute_s"], roof["hbm_s"], roof["ici_s"], roof["dcn_s"]) > 0
    assert 0 < roof["mfu"] <= 1 and result["xla_flops_loop_once"] > 0
    # Unscanned layers: no loop, so the HLO walk's HBM traffic and XLA's own bytes-accessed count the same
    # kernels (they differ in what each counts of a fusion's inputs, not in order of magnitude).
    assert 0.5 < result["hbm_bytes_estimate"] / result["xla_bytes_accessed_loop_once"] < 1.5
    assert math.isclose(result["model_flops_per_device"], result["model_tflops_per_step"] * 1e12 / 4)


def test_a_cpu_run_with_libtpu_installed_never_starts_the_tpu_backend():
    """The entry points' environment defaults pin JAX_PLATFORMS when no TPU chip is here: no libtpu error on
    stderr and no /tmp/libtpu_lockfile held by an ordinary run."""
    if tpu_plan.libtpu_version() is None:
        pytest.skip("libtpu not installed: nothing to keep quiet")
    code = ("from notellm_jax import runtime; runtime.set_environment_defaults(); import jax; "
            "print(jax.default_backend())")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "ALLOW_MULTIPLE_LIBTPU_LOAD")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert proc.stdout.strip() == "cpu"
    assert "tpu" not in proc.stderr.lower(), proc.stderr


def test_a_kernel_moves_only_its_update_or_its_slice_of_a_stacked_buffer():
    # dynamic-update-slice into a 1000-byte buffer its result aliases: reads 10 + 4 bytes, writes them back.
    assert tpu_plan._kernel_bytes("dynamic-update-slice", [1000], [1000, 10, 4], "") == 2 * (10 + 4)
    # A fusion reading a 12-byte dynamic slice of a 1000-byte operand: 12 read of it, 8 of the other, 8 written.
    body = "%ds = bf16[6]{0} dynamic-slice(%p, %i)\n%m = bf16[4]{0} multiply(%ds, %q)"
    assert tpu_plan._kernel_bytes("fusion", [8], [1000, 8], body) == 8 + 12 + 8
    assert tpu_plan._kernel_bytes("fusion", [8], [1000, 8], "") == 8 + 1000 + 8
