"""NoteLLM in JAX/Flax: one LLM that compresses notes into [EMB] embeddings and labels them."""
__version__ = "0.2.0"
