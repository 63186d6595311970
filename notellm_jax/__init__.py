"""NoteLLM in JAX/Flax: one LLM that compresses notes into [EMB] embeddings and labels them."""
from notellm_jax.runtime import skip_absent_tpu

__version__ = "0.2.0"

# Before anything of ours imports jax: with libtpu installed (dev requirements) on a machine without TPU chips,
# jax would try the TPU backend first (a libtpu error and a lock file). The one place this runs: every entry
# point (CLI, benches, library users) imports the package first; a JAX_PLATFORMS already set wins.
skip_absent_tpu()
