"""`model.param_dtype` holds for loaded weights: the real stories260K checkpoint (fp32 on disk) with
param_dtype=bfloat16 is born bf16 by the loader and becomes, resharded onto a 2 x 2 x 2 mesh, a bf16 train
state equal, leaf by leaf, to the abstract state (what the memory plan compiles and what orbax restores
into); a resumed state has the same dtypes and values; and the check refuses a state that differs."""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from notellm_jax.config import load_config, override
from notellm_jax.sharding import make_mesh
from notellm_jax.train import checkpointing
from notellm_jax.train.step import check_against_abstract, create_state, make_train_setup
from notellm_jax.weights.loading import load_initial_params

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.py")


def test_loaded_bf16_params_equal_the_abstract_state_and_survive_resume(shared_dir, tmp_path):
    config = load_config(TINY, ["model.param_dtype=bfloat16", f"paths.work_dir={tmp_path}",
                                f"paths.shared_dir={shared_dir}", "train.synthetic_data=true", "train.max_steps=2"])
    fp32 = jax.device_get(load_initial_params(override(config, {"model.param_dtype": "float32"}), None)[0])
    params, llama_cfg = load_initial_params(config, None)  # born in bf16 on the config's mesh
    assert {x.dtype for x in jax.tree.leaves(params["decoder"])} == {jnp.dtype(jnp.bfloat16)}
    spec = make_train_setup(config, llama_cfg, make_mesh(2, 2, 2), 2)
    state = create_state(spec, params)  # checks itself against spec.abstract_state
    dtypes = {jax.tree_util.keystr(p): x.dtype for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
    assert {d for k, d in dtypes.items() if "log_logit_scale" not in k} == {jnp.dtype(jnp.bfloat16)}
    assert dtypes["['log_logit_scale']"] == jnp.float32  # declared float32 in NoteLLM whatever the policy
    for (path, live), want in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(spec.abstract_state),
                                  strict=True):
        assert live.dtype == want.dtype and live.sharding == want.sharding, jax.tree_util.keystr(path)
    embedding = state.params["decoder"]["embed_tokens"]["embedding"]
    np.testing.assert_array_equal(np.asarray(embedding.astype(jnp.float32)),  # the fp32 checkpoint rounded
                                  np.asarray(jnp.asarray(fp32["decoder"]["embed_tokens"]["embedding"],
                                                         jnp.bfloat16).astype(jnp.float32)))

    manager = checkpointing.checkpoint_manager(config)
    checkpointing.save_checkpoint(manager, state, config, 2, force=True)
    manager.wait_until_finished()
    restored = checkpointing.restore_checkpoint(checkpointing.checkpoint_manager(config), spec, config, 2)
    for live, back in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        assert back.dtype == live.dtype and back.sharding == live.sharding
        np.testing.assert_array_equal(np.asarray(back.astype(jnp.float32)), np.asarray(live.astype(jnp.float32)))

    fp32 = jax.tree.map(lambda x: x.astype(jnp.float32), state)
    with pytest.raises(AssertionError, match=r"embed_tokens.*bfloat16"):
        check_against_abstract(fp32, spec.abstract_state)
