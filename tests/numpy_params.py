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
