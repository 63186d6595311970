"""The mixed-precision policy: one object says which dtype every tensor of the model has.

- `param`: stored weights (and so the optimiser's moments); fp32 on every shipped config.
- `compute`: activations and the inputs of every matmul (bf16 on accelerators).
- `output`: logits, always accumulated in this dtype straight out of the contraction
  (`preferred_element_type`), never rounded to `compute` first: the QK product and its softmax, the LM
  head, and the [EMB] similarity. MaxText calls these `float32_qk_product` and `float32_logits`
  ("for logit training stability"); Levanter's `mp=` policy is the same idea.

`LlamaConfig.precision` builds it from the config's dtype fields, so loaded and random weights, the
abstract state, the memory plan and a restored checkpoint all read the same policy.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Precision:
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    output_dtype: str = "float32"

    @property
    def param(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    @property
    def compute(self) -> jnp.dtype:
        return jnp.dtype(self.compute_dtype)

    @property
    def output(self) -> jnp.dtype:
        return jnp.dtype(self.output_dtype)

    def logits(self, x: jax.Array, kernel: jax.Array, dims) -> jax.Array:
        """`dot_general(x, kernel, dims)` on compute-dtype inputs, accumulated and returned in `output`."""
        return jax.lax.dot_general(x.astype(self.compute), kernel.astype(self.compute), dims,
                                   preferred_element_type=self.output)
