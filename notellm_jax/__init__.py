"""NoteLLM in JAX/Flax: one LLM that compresses notes into [EMB] embeddings and labels them."""
import os

# transformers/sentence-transformers must not import TensorFlow's Keras 3 (ENVIRONMENT.md), and no
# model hub is reachable: set both before anything imports transformers.
os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("USE_FLAX", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"


def configure_logging() -> None:
    """Entry points: our INFO messages on stderr; libraries (absl/orbax, jax) only from WARNING up."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("notellm_jax").setLevel(logging.INFO)
    for noisy in ("absl", "jax", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
