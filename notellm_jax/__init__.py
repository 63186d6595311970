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
