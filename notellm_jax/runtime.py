"""Process set-up shared by every entry point (environment defaults and logging, called once by main), and
the host facts that reports and benchmarks record beside their figures."""
from __future__ import annotations

import glob
import importlib.util
import logging
import os
import platform
import sys
from pathlib import Path

# transformers / sentence-transformers must not import TensorFlow's Keras 3 (it breaks them), no model
# hub is reachable, and TensorFlow's C++ INFO lines only clutter the logs.
ENV_DEFAULTS = {"USE_TF": "0", "USE_FLAX": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "TF_CPP_MIN_LOG_LEVEL": "2"}


def set_environment_defaults() -> None:
    """Before anything imports transformers or TensorFlow; variables already set win."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def skip_absent_tpu() -> None:
    """With libtpu installed (dev requirements: `notellm plan --target tpu`) on a machine without TPU chips,
    jax would try the TPU backend first: a libtpu error on stderr and a lock on /tmp/libtpu_lockfile that
    blocks the next process. Pin JAX_PLATFORMS to the backends that exist here; a value already set wins,
    and planning for a TPU topology needs only the CPU backend (it never initialises the TPU one)."""
    if importlib.util.find_spec("libtpu") is None or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return
    cuda = any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
    os.environ.setdefault("JAX_PLATFORMS", "cuda,cpu" if cuda else "cpu")
    jax = sys.modules.get("jax")  # imported before us: its config read the environment already
    if jax is not None and not jax.config.jax_platforms:
        jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])
    # Topology descriptions still load libtpu: let several planning processes share it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def configure_logging() -> None:
    """Our INFO messages on stderr; libraries (absl/orbax, jax) only from WARNING up."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("notellm_jax").setLevel(logging.INFO)
    for noisy in ("absl", "jax", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def fake_devices(n: int) -> None:
    """N fake CPU devices (for planning compiles); must run before jax is imported."""
    if n:
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
        os.environ.setdefault("JAX_PLATFORMS", "cpu")


def enable_compilation_cache(folder: str | Path) -> Path:
    """JAX's persistent compilation cache in `folder`: every program compiled from now on is written there and
    read back by the next process that compiles the same program, so a restarted service loads its shapes
    instead of compiling them. Call before the first compile."""
    import jax  # here, not at the top: this module is imported before jax may be (fake_devices)
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # the default (1 s) skips small shapes
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) ..."): the first `model name` of /proc/cpuinfo,
    else the platform's processor string, else the architecture. Every reported timing names it, since this
    project's 2-core VMs come in kinds whose speeds differ by 1.6x."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_summary() -> str:
    """`x86_64, 2 CPUs (AMD EPYC)`: the line reports put beside their figures."""
    return f"{platform.machine()}, {os.cpu_count()} CPUs ({cpu_model()})"
