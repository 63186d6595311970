"""Host facts recorded beside every reported figure (notellm_jax/runtime.py)."""
import platform

from notellm_jax.runtime import cpu_model, machine_summary

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13 64-Core Processor
flags\t\t: fpu vme

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13 64-Core Processor
"""


def test_cpu_model_reads_the_first_model_name(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    assert cpu_model(path) == "AMD EPYC 7B13 64-Core Processor"


def test_cpu_model_without_cpuinfo_falls_back_to_the_platform(tmp_path):
    # Absent file (macOS), and a file without a model name line (some Arm kernels).
    expected = platform.processor() or platform.machine()
    assert cpu_model(tmp_path / "absent") == expected
    (tmp_path / "arm").write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")
    assert cpu_model(tmp_path / "arm") == expected


def test_machine_summary_names_architecture_cores_and_model():
    summary = machine_summary()
    assert summary.startswith(f"{platform.machine()}, ")
    assert f"({cpu_model()})" in summary
