"""One `init_distributed()` for every entry point; the cluster is described by environment variables.

* One process (nothing set): no-op.
* Explicit cluster (bare GPU nodes, `launch/local_multiprocess.sh`, `launch/slurm_gpu.sbatch`):
  NOTELLM_COORDINATOR (host:port of process 0), NOTELLM_NUM_PROCESSES and NOTELLM_PROCESS_ID, all three
  or none. Each process sees all of its host's accelerators (JAX's own cluster detection is switched off,
  because under SLURM it would bind every process to the single GPU numbered SLURM_LOCALID).
* TPU pods and SLURM with one task per GPU: NOTELLM_DISTRIBUTED=auto lets `jax.distributed.initialize()`
  detect the cluster.
Contradictions are errors, raised before anything connects: explicit variables together with
NOTELLM_DISTRIBUTED=auto, or explicit variables that disagree with the SLURM task this process runs in
(SLURM_NTASKS / SLURM_PROCID), which would otherwise hang at the first collective.
Only process 0 writes logs, metrics and reports (`is_primary`); every process takes part in checkpointing.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Mapping

import jax

logger = logging.getLogger(__name__)

EXPLICIT_VARS = ("NOTELLM_COORDINATOR", "NOTELLM_NUM_PROCESSES", "NOTELLM_PROCESS_ID")
MODE_VAR = "NOTELLM_DISTRIBUTED"
_initialized = False


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """How this process joins the run: mode "single", "explicit" or "auto" (JAX detects the rest)."""
    mode: str
    coordinator: str | None = None
    num_processes: int = 1
    process_id: int = 0


def _int_var(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"{name}={env[name]!r} is not an integer") from None


def _check_against_slurm(env: Mapping[str, str], spec: ClusterSpec) -> None:
    """Inside an srun task, the explicit layout must be SLURM's (one task per process)."""
    for slurm_var, ours, value in (("SLURM_NTASKS", "NOTELLM_NUM_PROCESSES", spec.num_processes),
                                   ("SLURM_PROCID", "NOTELLM_PROCESS_ID", spec.process_id)):
        if env.get(slurm_var) and _int_var(env, slurm_var) != value:
            raise ValueError(f"{ours}={value} contradicts {slurm_var}={env[slurm_var]} of the SLURM task this "
                             f"process runs in: start one srun task per process (--ntasks={spec.num_processes}), "
                             f"or unset the SLURM_* variables when launching outside srun")


def _check_auto_under_slurm(env: Mapping[str, str]) -> None:
    """JAX's SLURM detection gives each process one GPU (SLURM_LOCALID): wrong with one task per node."""
    tasks, nodes, gpus = (env.get(v) for v in ("SLURM_NTASKS", "SLURM_STEP_NUM_NODES", "SLURM_GPUS_ON_NODE"))
    if not (tasks and nodes and gpus) or env.get("JAX_LOCAL_DEVICE_IDS"):
        return
    if int(tasks) == int(nodes) and int(gpus) > 1:
        raise ValueError(f"{MODE_VAR}=auto under SLURM binds each process to one GPU (SLURM_LOCALID), but this "
                         f"step runs one task per node with SLURM_GPUS_ON_NODE={gpus}: use one task per GPU, "
                         f"set JAX_LOCAL_DEVICE_IDS, or use the explicit NOTELLM_* variables "
                         f"(launch/slurm_gpu.sbatch does)")


def cluster_from_env(env: Mapping[str, str]) -> ClusterSpec:
    """The cluster layout the environment asks for; ValueError naming the variables when they disagree."""
    mode = env.get(MODE_VAR, "")
    if mode not in ("", "auto"):
        raise ValueError(f"{MODE_VAR}={mode!r}: the only value is 'auto' (leave it unset otherwise)")
    present = [name for name in EXPLICIT_VARS if env.get(name)]
    if present and len(present) != len(EXPLICIT_VARS):
        missing = [name for name in EXPLICIT_VARS if name not in present]
        raise ValueError(f"distributed setup: {', '.join(present)} set but {', '.join(missing)} missing")
    if present and mode == "auto":
        raise ValueError(f"{MODE_VAR}=auto and {', '.join(EXPLICIT_VARS)} are both set: choose auto-detection "
                         f"or the explicit variables, not both")
    if mode == "auto":
        _check_auto_under_slurm(env)
        return ClusterSpec("auto")
    if not present:
        return ClusterSpec("single")
    coordinator = env["NOTELLM_COORDINATOR"]
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"NOTELLM_COORDINATOR={coordinator!r} is not host:port")
    num, pid = _int_var(env, "NOTELLM_NUM_PROCESSES"), _int_var(env, "NOTELLM_PROCESS_ID")
    if num < 1 or not 0 <= pid < num:
        raise ValueError(f"NOTELLM_PROCESS_ID={pid} is outside [0, NOTELLM_NUM_PROCESSES={num})")
    spec = ClusterSpec("explicit", coordinator, num, pid)
    _check_against_slurm(env, spec)
    return spec


def init_distributed() -> None:
    """Join the multi-process run described by the environment (idempotent); call before any JAX work."""
    global _initialized
    if _initialized:
        return
    spec = cluster_from_env(os.environ)
    if spec.mode != "single":
        # CPU hosts (loopback tests, CPU clusters) need cross-process collectives; accelerators ignore this.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if spec.mode == "explicit":
        jax.distributed.initialize(coordinator_address=spec.coordinator, num_processes=spec.num_processes,
                                   process_id=spec.process_id, cluster_detection_method="deactivate")
    elif spec.mode == "auto":
        jax.distributed.initialize()
    if spec.mode != "single":
        logger.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                    jax.local_device_count(), jax.device_count())
    _initialized = True


def is_primary() -> bool:
    return jax.process_index() == 0
