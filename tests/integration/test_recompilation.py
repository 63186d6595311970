"""Recompilation guard: the train step, each embedding bucket and greedy decoding compile once, however
many calls follow (a shape, dtype or static argument that changed per call would show up here as a second
cache entry, and on an accelerator as minutes of recompiling)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from notellm_jax.config import Config, override
from notellm_jax.data.input_pipeline import synthetic_batches
from notellm_jax.infer.encoder import BatchEmbedder
from notellm_jax.model import decode
from notellm_jax.model.families import preset
from notellm_jax.model.llama import Llama
from notellm_jax.model.params import abstract_params, init_params
from notellm_jax import sharding as shd
from notellm_jax.sharding import make_mesh
from notellm_jax.train.step import compile_steps, create_state, make_train_setup, to_global_batch
from notellm_jax.weights.loading import load_initial_params
from step_compare import sparse_targets


@pytest.mark.parametrize("head_rows_per_note", [0, 3], ids=["unpacked", "packed_head"])
def test_train_step_compiles_once(head_rows_per_note):
    """Also with the packed LM head over batches of different fill (each fits 3 rows per note)."""
    config = override(Config(), {"model.checkpoint": "random:stories260k", "train.synthetic_data": True,
                                 "prompt.max_length": 32, "prompt.max_targets": 4, "train.batch_pairs": 4,
                                 "model.emb_dim": 16, "train.head_rows_per_note": head_rows_per_note})
    params, llama_cfg = load_initial_params(config, None)
    setup = make_train_setup(config, llama_cfg, make_mesh(1, 4, 1, devices=jax.devices()[:4]), total_steps=10)
    state = create_state(setup, params)
    step_fn, eval_fn = compile_steps(setup)
    data = synthetic_batches(config, llama_cfg, 0)
    def batch(seed):
        out = to_global_batch(setup, sparse_targets(next(data), seed) if head_rows_per_note else next(data))
        assert ("head_index" in out) == bool(head_rows_per_note)  # packed batches really are packed
        return out

    for i in range(3):
        state, metrics = step_fn(state, batch(i))
    for i in range(2):
        eval_fn(state, batch(5 + i))
    jax.block_until_ready(metrics)
    assert step_fn._cache_size() == 1 and eval_fn._cache_size() == 1
    # The shardings are the step's own (explicit in_shardings), not whatever the arguments carry: an
    # unsharded abstract batch compiles with its rows over (data, fsdp) and the state as the setup lays it out.
    unsharded = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch(9).items()}
    state_in, batch_in = step_fn.lower(setup.abstract_state, unsharded).compile().input_shardings[0]
    for leaf in jax.tree.leaves(batch_in):
        assert leaf.is_equivalent_to(shd.batch_sharding(setup.mesh, 1), 1)
    for got, want in zip(jax.tree.leaves(state_in), jax.tree.leaves(setup.abstract_state), strict=True):
        assert got.is_equivalent_to(want.sharding, len(want.shape))


def test_each_embedding_bucket_compiles_once():
    cfg = preset("stories260k", num_hidden_layers=2)
    params = init_params(cfg, jax.random.key(0))
    model = Llama(cfg)

    def apply(p, ids, mask, read):
        hidden = model.apply({"params": p}, ids, mask)
        return jnp.take_along_axis(hidden, read[:, None, None], axis=1)[:, 0]

    embedder = BatchEmbedder(apply, params, abstract_params(cfg), make_mesh(1, 2, 1, devices=jax.devices()[:2]),
                             batch_size=4, buckets=[8, 16], pad_id=0, padding_side="right", source="test")
    rng = np.random.default_rng(0)
    for lengths in ([3, 5, 8], [2, 7, 12, 16, 4], [9], [1, 1, 1, 1, 1, 1]):
        embedder([list(rng.integers(1, 500, n)) for n in lengths])
    assert embedder._fn._cache_size() == 2  # one per bucket length


def test_greedy_decode_compiles_once_per_shape():
    cfg = preset("stories260k", num_hidden_layers=2)
    params = init_params(cfg, jax.random.key(1))
    model = Llama(cfg)
    before = decode._decode._cache_size()
    ids = np.ones((2, 6), np.int32)
    for prompt in (ids, ids + 1, ids + 2):
        decode.greedy_decode(model, params, prompt, np.ones_like(prompt), 4, eos_id=2)
    assert decode._decode._cache_size() == before + 1
