"""The trainer trains the tiny config from the notellm_prepared TFDS dataset (issue 13).

configs/tiny.py is prepared from the real Stack Exchange data in ../shared (import, co-occurrence, splits,
shards, and the TFDS dataset built on the in-process Beam runner), then trained for a few steps twice through
`notellm_jax.train.train`: once reading the shards, once with data.train_input="tfds". The TFDS run must see
exactly the shard run's batches and produce exactly its losses, step for step, and they must be finite.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from notellm_jax.config import load_config
from notellm_jax.data import prepare
from notellm_jax.train import trainer

pytestmark = pytest.mark.slow
TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.py")
STEPS = 3
REAL_BATCHES = trainer.batches


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, shared_dir) -> Path:
    data = tmp_path_factory.mktemp("tiny_tfds") / "data"
    config = load_config(TINY, [f"paths.data_dir={data}", f"paths.shared_dir={shared_dir}", "data.train_input=tfds"])
    stats = prepare.prepare(config)  # default stages with train_input=tfds: the tfds stage included
    assert stats["tfds"]["pairs"]["train"] == stats["shards"]["train_pairs_written"] == 64
    return data


def train_a_few_steps(monkeypatch, work: Path, data_dir: Path, shared_dir: Path, train_input: str
                      ) -> tuple[list[dict], list[dict]]:
    """(the training batches the trainer was fed, its per-step metrics rows)."""
    fed: list[dict] = []

    def recording(config, llama_cfg, split, start_step):
        for batch in REAL_BATCHES(config, llama_cfg, split, start_step):
            if split == "train":
                fed.append(batch)
            yield batch

    monkeypatch.setattr(trainer, "batches", recording)
    config = load_config(TINY, [f"paths.work_dir={work}", f"paths.data_dir={data_dir}",
                                f"paths.shared_dir={shared_dir}", f"data.train_input={train_input}",
                                f"train.max_steps={STEPS}", "train.log_every=1", "train.eval_batches=0"])
    trainer.train(config)
    rows = [json.loads(line) for line in (work / "logs" / "metrics.jsonl").read_text().splitlines()]
    return fed, [r for r in rows if r["split"] == "train"]


def test_tiny_config_trains_from_tfds_as_from_shards(monkeypatch, tmp_path, data_dir, shared_dir):
    shard_batches, shard_rows = train_a_few_steps(monkeypatch, tmp_path / "shards", data_dir, shared_dir, "shards")
    tfds_batches, tfds_rows = train_a_few_steps(monkeypatch, tmp_path / "tfds", data_dir, shared_dir, "tfds")
    assert len(tfds_batches) == len(shard_batches) == STEPS
    for step, (want, got) in enumerate(zip(shard_batches, tfds_batches)):
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"step {step} {key}")
    assert [r["step"] for r in tfds_rows] == list(range(1, STEPS + 1))
    for want, got in zip(shard_rows, tfds_rows):
        assert np.isfinite(got["loss"]) and np.isfinite(got["loss_cl"])
        assert (got["loss"], got["loss_cl"]) == (want["loss"], want["loss_cl"]), (shard_rows, tfds_rows)
    assert (tmp_path / "tfds" / "export" / "notellm.json").is_file()
