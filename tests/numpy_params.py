"""Random model parameters without compiling anything: shapes from `jax.eval_shape`, values from numpy.

On this CPU, compiling a model's random initialisers (one threefry kernel per parameter shape) costs
~10-25 s per model config, more than the tests that use the weights; tests that only need some random
weights of the right shapes draw them here instead.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from flax import linen as nn


def numpy_params(init: Callable[..., Any], *args: Any, seed: int = 0, scalar: float = 3.0) -> Any:
    """A tree shaped like `init(*args)` (unboxed): matrices ~ N(0, 0.02), vectors 1 + N(0, 0.05) (norm
    scales away from 1, where a transposed or skipped scale shows), scalars `scalar`; float32 numpy."""
    rng = np.random.default_rng(seed)
    draw = {0: lambda shape: np.full(shape, scalar), 1: lambda shape: 1.0 + 0.05 * rng.normal(size=shape)}
    shapes = nn.meta.unbox(jax.eval_shape(init, *args))
    return jax.tree.map(lambda s: draw.get(s.ndim, lambda shape: 0.02 * rng.normal(size=shape))(s.shape)
                        .astype(np.float32), shapes)


def padded_tiny_models(vocab: int = 300, multiple: int = 128) -> tuple[Any, Any, Any, Any]:
    """(cfg, params, padded cfg, padded params): a random tiny untied LLaMA of `vocab` tokens and the same
    weights with the vocabulary padded to a multiple of `multiple` (`grow_vocab` adding no token)."""
    from notellm_jax.model.families import preset
    from notellm_jax.model.params import grow_vocab, init_params

    cfg = preset("tiny", vocab_size=vocab, tie_word_embeddings=False)
    params = numpy_params(lambda key: init_params(cfg, key), jax.random.key(0))
    padded, padded_cfg = grow_vocab(params, cfg.replace(vocab_pad_multiple=multiple), 0)
    return cfg, params, padded_cfg, padded
