"""Training: `train(config)`; the command line is `python -m notellm_jax.train --config ...`."""
from notellm_jax.train.trainer import train

__all__ = ["train"]
