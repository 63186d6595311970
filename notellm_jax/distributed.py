"""One `init_distributed()` for every entry point.

* One process (nothing set): no-op.
* Explicit cluster (bare GPU nodes, `launch/local_multiprocess.sh`): NOTELLM_COORDINATOR (host:port),
  NOTELLM_NUM_PROCESSES and NOTELLM_PROCESS_ID, all three or none.
* TPU pods and SLURM: NOTELLM_DISTRIBUTED=auto lets `jax.distributed.initialize()` detect the cluster.
Only process 0 writes logs, metrics and reports (`is_primary`); every process takes part in checkpointing.
"""
from __future__ import annotations

import os

import jax

_ENV = ("NOTELLM_COORDINATOR", "NOTELLM_NUM_PROCESSES", "NOTELLM_PROCESS_ID")
_initialized = False


def init_distributed() -> None:
    global _initialized
    if _initialized:
        return
    given = {name: os.environ.get(name) for name in _ENV}
    present = [name for name, value in given.items() if value]
    if present and len(present) != len(_ENV):
        missing = sorted(set(_ENV) - set(present))
        raise ValueError(f"distributed setup: {', '.join(present)} set but {', '.join(missing)} missing")
    if present:
        num, pid = int(given["NOTELLM_NUM_PROCESSES"]), int(given["NOTELLM_PROCESS_ID"])
        if not 0 <= pid < num:
            raise ValueError(f"NOTELLM_PROCESS_ID={pid} is outside [0, NOTELLM_NUM_PROCESSES={num})")
        if jax.config.jax_platforms in (None, "", "cpu") and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=given["NOTELLM_COORDINATOR"], num_processes=num,
                                   process_id=pid)
    elif os.environ.get("NOTELLM_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
    _initialized = True


def is_primary() -> bool:
    return jax.process_index() == 0
