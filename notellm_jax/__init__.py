"""NoteLLM in JAX/Flax: one LLM that compresses notes into [EMB] embeddings and labels them."""
from notellm_jax.runtime import skip_absent_tpu

__version__ = "0.2.0"

# Before anything of ours imports jax: with libtpu installed (dev requirements) on a machine without TPU chips,
# jax would try the TPU backend first (a libtpu error and a lock file). Benches and library users get the same
# pin as the CLI (`runtime.set_environment_defaults`); a JAX_PLATFORMS already set wins.
skip_absent_tpu()
