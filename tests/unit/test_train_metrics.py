"""The FLOP formula behind MFU, against the matmuls the model actually runs (counted from its jaxpr), and
the metrics writer and window."""
import json

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from notellm_jax.model.families import preset
from notellm_jax.model.llama import Llama
from notellm_jax.model.params import init_params
from notellm_jax.train.metrics import (MetricsWriter, StepFlops, forward_flops_per_token, layer_flops_at_rows,
                                      train_step_flops)


def matmul_flops(jaxpr) -> float:
    """2 x output elements x contracted size, summed over every dot_general, sub-jaxprs included."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in contract])
    for sub in jax.extend.core.subjaxprs(jaxpr):  # pjit / remat bodies (the model is unscanned here)
        total += matmul_flops(sub)
    return total


@pytest.mark.parametrize("layers,seq_len,gqa", [(2, 16, True), (3, 24, False)])
def test_forward_flops_equal_the_model_matmuls(layers, seq_len, gqa):
    cfg = preset("stories260k", num_hidden_layers=layers, num_key_value_heads=4 if gqa else 8)
    params = jax.eval_shape(lambda key: init_params(cfg, key), jax.random.key(0))  # shapes suffice for a jaxpr: nothing compiles
    ids = jnp.zeros((2, seq_len), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda p: Llama(cfg).apply({"params": p}, ids, jnp.ones_like(ids)))(params)
    counted = matmul_flops(jaxpr.jaxpr)
    assert counted > 0
    assert forward_flops_per_token(cfg, seq_len, layers) * ids.size == pytest.approx(counted, rel=1e-9)


@pytest.mark.parametrize("layers,seq_len,rows,gqa", [(2, 16, 3, True), (3, 24, 5, False), (1, 12, 12, True)])
def test_read_rows_flops_equal_the_model_matmuls(layers, seq_len, rows, gqa):
    """NoteLLM's last layer runs queries, attention output and MLP at the read rows only: the count MFU uses
    equals the matmuls of that program (keys and values still at every position)."""
    cfg = preset("stories260k", num_hidden_layers=layers, num_key_value_heads=4 if gqa else 8)
    params = jax.eval_shape(lambda key: init_params(cfg, key), jax.random.key(0))
    ids = jnp.zeros((2, seq_len), jnp.int32)
    read = jnp.zeros((2, rows), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda p: Llama(cfg).apply({"params": p}, ids, jnp.ones_like(ids),
                                                      read_positions=read))(params)
    counted = matmul_flops(jaxpr.jaxpr)
    expected = ids.shape[0] * (seq_len * forward_flops_per_token(cfg, seq_len, layers - 1)
                               + layer_flops_at_rows(cfg, seq_len, rows))
    assert expected == pytest.approx(counted, rel=1e-9)
    assert counted < forward_flops_per_token(cfg, seq_len, layers) * ids.size or rows == seq_len


def test_step_flops_prune_the_last_layer_only_when_unscanned():
    """The trainer's count: the last trained layer at 1 + max_targets rows; scanned layers compute every row."""
    from notellm_jax.config import Config, override

    config = override(Config(), {"train.batch_pairs": 3, "prompt.max_length": 32, "prompt.max_targets": 4,
                                 "model.emb_dim": 16})
    cfg = preset("stories260k", num_hidden_layers=4)
    kw = dict(sequences=6, seq_len=32, targets=4, emb_dim=16, trained_layers=2, forward_only_layers=0)
    assert StepFlops(cfg, config, frozen_layers=2)(0) == pytest.approx(train_step_flops(cfg, **kw, read_rows=5))
    scanned = cfg.replace(scan_layers=True)
    assert StepFlops(scanned, config, frozen_layers=2)(0) == pytest.approx(train_step_flops(scanned, **kw))
    assert train_step_flops(cfg, **kw, read_rows=5) < train_step_flops(cfg, **kw)
    # The frozen bottom, where it runs (cache misses), is a forward over every position.
    bottom = 3 * 32 * forward_flops_per_token(cfg, 32, 2)
    assert StepFlops(cfg, config, 2)(3) - StepFlops(cfg, config, 2)(0) == pytest.approx(bottom)
    # A "gcl_only" step computes no LM head and its last layer at [EMB]'s row alone.
    gcl_only = override(config, {"train.objective": "gcl_only"})
    assert StepFlops(cfg, gcl_only, frozen_layers=2)(0) == pytest.approx(
        train_step_flops(cfg, **{**kw, "targets": 0}, read_rows=1))
    assert StepFlops(cfg, gcl_only, 2)(0) < StepFlops(cfg, config, 2)(0)
    # A packed head (train.head_rows_per_note) runs at that many rows per note; the last layer still reads
    # every supervised slot.
    packed = override(config, {"train.head_rows_per_note": 1})
    assert StepFlops(cfg, packed, frozen_layers=2)(0) == pytest.approx(
        train_step_flops(cfg, **{**kw, "targets": 1}, read_rows=5))


def test_train_step_flops_compose():
    """3x (forward + backward) for trained layers, 1x for frozen ones run, head at the supervised positions."""
    cfg = preset("stories260k")
    per_token = forward_flops_per_token(cfg, 32, 1)
    head = 2.0 * cfg.hidden_size * cfg.vocab_size * 4 + 2.0 * cfg.hidden_size * 16
    got = train_step_flops(cfg, sequences=6, seq_len=32, targets=4, emb_dim=16, trained_layers=2,
                           forward_only_layers=3)
    assert got == pytest.approx(6 * (32 * (3 * 2 * per_token + 3 * per_token) + 3 * head))


def test_writer_writes_jsonl_and_disabled_writer_writes_nothing(tmp_path):
    writer = MetricsWriter(tmp_path / "logs", total_steps=4)
    writer.write(2, {"loss": 1.5, "accuracy": 0.25})
    writer.write(2, {"loss": 1.25}, prefix="val")
    writer.close()
    rows = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"], r["loss"]) for r in rows] == [(2, "train", 1.5), (2, "val", 1.25)]
    silent = MetricsWriter(tmp_path / "other", total_steps=4, enabled=False)
    silent.write(1, {"loss": 1.0})
    silent.close()
    assert not (tmp_path / "other").exists()
