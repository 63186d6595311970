"""Process set-up shared by every entry point: environment defaults and logging (called once, by main)."""
from __future__ import annotations

import logging
import os

# transformers / sentence-transformers must not import TensorFlow's Keras 3 (it breaks them), no model
# hub is reachable, and TensorFlow's C++ INFO lines only clutter the logs.
ENV_DEFAULTS = {"USE_TF": "0", "USE_FLAX": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "TF_CPP_MIN_LOG_LEVEL": "2"}


def set_environment_defaults() -> None:
    """Before anything imports transformers or TensorFlow; variables already set win."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def configure_logging() -> None:
    """Our INFO messages on stderr; libraries (absl/orbax, jax) only from WARNING up."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("notellm_jax").setLevel(logging.INFO)
    for noisy in ("absl", "jax", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
