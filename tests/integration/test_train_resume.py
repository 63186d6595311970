"""Checkpoint and resume through `notellm_jax.train.train`: a run that dies after n steps and is restarted
finishes with exactly the state of a run that never stopped.

The interruption is real: the data iterator raises after n batches, so the first process ends with only
its periodic checkpoint at step n, and the second process has to restore model, optimizer and step from it
(same config, hence the same learning-rate schedule over n + m steps). The runs train the top 2 of 5
layers through the frozen-feature cache, so the checkpoint holds trained, frozen and optimizer state.
Final states are read back from the final Orbax checkpoints onto a single-device mesh.
"""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from notellm_jax.train import trainer
from notellm_jax.weights import loading
from notellm_jax.train.checkpointing import checkpoint_manager, restore_checkpoint
from notellm_jax.train.step import make_train_setup
from notellm_jax.weights.loading import load_initial_params
from notellm_jax.config import Config, load_config
from notellm_jax.sharding import make_mesh

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.py") + ":random"
N, M = 2, 2
REAL_BATCHES = trainer.batches


class Interrupted(Exception):
    """Stands for the process being killed between two steps."""


def resume_config(work_dir: Path, *extra: str) -> Config:
    return load_config(TINY, ["train.synthetic_data=true", "prompt.max_length=32", "prompt.max_targets=4",
                              "train.batch_pairs=8", f"train.max_steps={N + M}", f"train.checkpoint_every={N}",
                              "train.keep_checkpoints=5", "train.log_every=1", "train.async_checkpoint=false",
                              "model.train_top_layers=2", "model.cache_frozen_features=true",
                              f"paths.work_dir={work_dir}", *extra])


def count_weight_reads(monkeypatch, reads: list[str]) -> None:
    """Record every read of a run's initial weights (`InitialWeights.read`), by the run's work dir."""
    real = loading.InitialWeights.read

    def read(self, on_leaf=None):
        reads.append(self.config.work_dir.name)
        return real(self, on_leaf)

    monkeypatch.setattr(loading.InitialWeights, "read", read)


def watch_batches(monkeypatch, starts: list[int], stop_after: int | None = None) -> None:
    """Record where each run's data stream starts; optionally die after `stop_after` training batches."""
    def batches(config, llama_cfg, split, start_step):
        starts.append(start_step)
        for served, batch in enumerate(REAL_BATCHES(config, llama_cfg, split, start_step)):
            if served == stop_after:
                raise Interrupted(f"killed before step {start_step + served}")
            yield batch

    monkeypatch.setattr(trainer, "batches", batches)


def final_state(config: Config) -> tuple[int, dict]:
    """The latest checkpoint of a run, restored onto one device, as host arrays."""
    params, llama_cfg = load_initial_params(config, None)
    spec = make_train_setup(config, llama_cfg, make_mesh(1, 1, 1, devices=jax.devices()[:1]),
                                   config.train.max_steps)
    manager = checkpoint_manager(config)
    state = restore_checkpoint(manager, spec, config, config.train.max_steps)
    manager.close()
    return int(state.step), jax.tree.map(np.asarray, jax.device_get(
        {"params": state.params, "frozen": state.frozen, "opt_state": state.opt_state}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(uninterrupted, interrupted + resumed): their configs, returned metrics and recorded data starts."""
    monkeypatch = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("resume")
    reads: list[str] = []
    try:
        count_weight_reads(monkeypatch, reads)
        whole_starts: list[int] = []
        watch_batches(monkeypatch, whole_starts)
        whole = resume_config(root / "whole")
        whole_metrics = trainer.train(whole)

        split_starts: list[int] = []
        split = resume_config(root / "split")
        watch_batches(monkeypatch, split_starts, stop_after=N)
        with pytest.raises(Interrupted):
            trainer.train(split)
        manager = checkpoint_manager(split)
        steps_after_crash = list(manager.all_steps())
        manager.close()
        watch_batches(monkeypatch, split_starts)
        reads_before_resume = list(reads)
        split_metrics = trainer.train(split)
        resume_reads = reads[len(reads_before_resume):]
    finally:
        monkeypatch.undo()
    return dict(whole=whole, whole_metrics=whole_metrics, whole_starts=whole_starts, split=split,
                split_metrics=split_metrics, split_starts=split_starts, steps_after_crash=steps_after_crash,
                reads_before_resume=reads_before_resume, resume_reads=resume_reads)


def test_resumed_run_starts_from_the_checkpoint_at_step_n(runs):
    assert runs["whole_starts"] == [0]
    assert runs["steps_after_crash"] == [N]
    assert runs["split_starts"] == [0, N]


def test_a_resumed_run_does_not_read_the_initial_weights(runs):
    """The checkpoint is looked for before the initial weights are read: a resume restores it into the
    abstract state and never reads them (for a 7B checkpoint, a full read for nothing)."""
    assert runs["reads_before_resume"] == ["whole", "split"]  # each fresh start read them once
    assert runs["resume_reads"] == []


def test_resumed_run_equals_uninterrupted_run(runs):
    whole_step, whole = final_state(runs["whole"])
    split_step, split = final_state(runs["split"])
    assert whole_step == split_step == N + M
    whole_leaves = jax.tree_util.tree_leaves_with_path(whole)
    split_leaves = jax.tree_util.tree_leaves_with_path(split)
    assert [p for p, _ in whole_leaves] == [p for p, _ in split_leaves]
    for (path, w), (_, s) in zip(whole_leaves, split_leaves):
        np.testing.assert_array_equal(s, w, err_msg=jax.tree_util.keystr(path))
    # The last step's metrics (not the timings) agree too.
    for key in ("loss", "loss_cl", "loss_gen", "accuracy", "log_logit_scale", "grad_norm", "learning_rate"):
        assert runs["split_metrics"][key] == runs["whole_metrics"][key], key
    # Not vacuous: the top layers moved during those N + M steps, the frozen ones did not.
    initial, _ = load_initial_params(runs["whole"], None)
    q_proj = lambda tree, layer: tree["decoder"][layer]["attn"]["q_proj"]["kernel"]  # noqa: E731
    assert np.max(np.abs(q_proj(whole["params"], "layers_4") - q_proj(initial, "layers_4"))) > 1e-4
    np.testing.assert_array_equal(q_proj(whole["frozen"], "layers_0"), q_proj(initial, "layers_0"))


def test_resuming_with_another_seed_is_refused(runs):
    other_seed = resume_config(runs["split"].work_dir, "train.seed=1")
    with pytest.raises(ValueError, match=rf"step {N + M} was trained with seed 0, this run has seed 1"):
        trainer.train(other_seed)
