"""Training faults that must not pass as success: a damaged latest checkpoint (resume falls back to the
newest good one and continues exactly as the uninterrupted run did), metrics.jsonl after a resume (each
step once), non-finite steps (discarded, then the run stops with the step named, no export, exit 3), and a
finite but collapsed run (the guard stops it at the first anomaly and names a checkpoint from before it).

Runs use the tiny config's random model on synthetic batches (cheap); the CLI run uses stories260K on real
prepared data, since only such a run would write an export."""
from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import notellm_jax  # noqa: F401
from notellm_jax.config import Config, load_config
from notellm_jax.errors import CheckpointError, TrainingDivergedError
from notellm_jax.sharding import make_mesh
from notellm_jax.train import trainer
from notellm_jax.train.checkpointing import _restore_step, checkpoint_manager
from notellm_jax.train.metrics import truncate_metrics
from notellm_jax.train.step import make_train_setup
from notellm_jax.weights.loading import load_initial_params

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.py")
STEPS = 5
REAL_BATCHES = trainer.batches


def synthetic_config(work_dir: Path, *extra: str) -> Config:
    return load_config(TINY + ":random", [
        "train.synthetic_data=true", "prompt.max_length=32", "prompt.max_targets=4", "prompt.title_max_tokens=8",
        "prompt.content_max_tokens=16", "train.batch_pairs=8",
        f"train.max_steps={STEPS}", "train.checkpoint_every=1", "train.keep_checkpoints=10", "train.log_every=1",
        "train.async_checkpoint=false", f"paths.work_dir={work_dir}", *extra])


def train_rows(work_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (work_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


def restored(config: Config, step: int) -> dict:
    """One checkpoint step's params and optimiser state, on one device, as host arrays."""
    _, llama_cfg = load_initial_params(config, None)
    setup = make_train_setup(config, llama_cfg, make_mesh(1, 1, 1, devices=jax.devices()[:1]),
                             config.train.max_steps)
    manager = checkpoint_manager(config)
    state, _ = _restore_step(manager, step, setup)
    manager.close()
    return jax.tree.map(np.asarray, jax.device_get({"params": state.params, "opt_state": state.opt_state}))


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """An uninterrupted run with a checkpoint after every step (kept pristine: tests work on copies)."""
    work = tmp_path_factory.mktemp("whole")
    trainer.train(synthetic_config(work))
    assert [r["step"] for r in train_rows(work)] == list(range(1, STEPS + 1))
    return work


def _copy(whole: Path, tmp_path: Path) -> Path:
    shutil.copytree(whole, tmp_path / "run")
    return tmp_path / "run"


def _truncate_data_files(step_dir: Path) -> None:
    """Cut each TensorStore data file of the step's state in half (which arrays a file holds varies from
    run to run, so cutting only one might spare every array that is read)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for data in files:
        data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])


def _cut_metadata(step_dir: Path) -> None:
    meta = step_dir / "meta" / "metadata"
    meta.write_text(meta.read_text()[:40])


@pytest.mark.slow
def test_damaged_latest_steps_fall_back_to_the_newest_good_one(whole, tmp_path, monkeypatch, caplog):
    run = _copy(whole, tmp_path)
    ckpt = run / "checkpoints"
    _truncate_data_files(ckpt / str(STEPS))             # step 5: its data files cut in half
    _cut_metadata(ckpt / str(STEPS - 1))                 # step 4: its metadata JSON cut
    starts: list[int] = []

    def batches(config, llama_cfg, split, start_step):
        starts.append(start_step)
        return REAL_BATCHES(config, llama_cfg, split, start_step)

    monkeypatch.setattr(trainer, "batches", batches)
    with caplog.at_level(logging.INFO, logger="notellm_jax.train.checkpointing"):
        trainer.train(synthetic_config(run))
    assert starts == [STEPS - 2]
    warnings = [r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()]
    assert len(warnings) == 2
    for warning, step in zip(warnings, (STEPS, STEPS - 1)):
        assert warning.startswith(f"checkpoint step {step} at {ckpt / str(step)} cannot be restored (")
    assert "resuming from checkpoint step 3" in caplog.text
    for step in (STEPS - 1, STEPS):  # the re-made steps are reported once orbax has committed them
        assert f"checkpoint step {step} committed: {ckpt / str(step)}" in caplog.text
    assert (ckpt / f"{STEPS}.damaged").is_dir() and (ckpt / f"{STEPS - 1}.damaged").is_dir()

    # Each step once in metrics.jsonl, and the re-run steps equal the uninterrupted run's.
    rows, reference = train_rows(run), train_rows(whole)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for mine, theirs in zip(rows, reference):
        for key in ("loss", "loss_cl", "loss_gen", "grad_norm", "learning_rate", "log_logit_scale"):
            assert mine[key] == theirs[key], (mine["step"], key)
    final, expected = restored(synthetic_config(run), STEPS), restored(synthetic_config(whole), STEPS)
    jax.tree.map(np.testing.assert_array_equal, final, expected)


def test_damaged_latest_step_with_stop_is_an_error_naming_the_path(whole, tmp_path):
    run = _copy(whole, tmp_path)
    step_dir = run / "checkpoints" / str(STEPS)
    _cut_metadata(step_dir)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(step_dir))}: checkpoint step {STEPS} cannot be "
                                              r"restored \(.+\); train.on_bad_checkpoint=stop"):
        trainer.train(synthetic_config(run, "train.on_bad_checkpoint=stop"))
    assert step_dir.is_dir() and not (run / "checkpoints" / f"{STEPS}.damaged").exists()


def test_metrics_after_resume_from_an_earlier_checkpoint(whole, tmp_path):
    """Rows after the resumed step are dropped (they are logged again); a cut last line goes too."""
    run = _copy(whole, tmp_path)
    path = run / "logs" / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 6, "spl')
    truncate_metrics(path, 2)
    assert [r["step"] for r in train_rows(run)] == [1, 2]
    assert path.read_text().splitlines() == (whole / "logs" / "metrics.jsonl").read_text().splitlines()[:2]


# ----------------------------------------------------------------------------- non-finite steps


GUARD_RULES_OFF = ("train.loss_spike_factor=0", "train.max_abs_log_logit_scale=0", "train.max_grad_norm=0",
                   "train.max_zero_grad_steps=0")


@pytest.mark.slow
def test_nonfinite_steps_are_discarded_then_the_run_stops(tmp_path):
    # The guard's finite-anomaly rules would stop this run at its collapse, before any non-finite step.
    config = synthetic_config(tmp_path, "train.learning_rate=1e6", "train.warmup_fraction=0",
                              "train.max_nonfinite_steps=2", "train.max_steps=12", *GUARD_RULES_OFF)
    with pytest.raises(TrainingDivergedError) as info:
        trainer.train(config)
    message = str(info.value)
    match = re.match(r"step (\d+): non-finite (loss|gradient norm) .*stopping after 3 non-finite step\(s\) "
                     r"\(train.max_nonfinite_steps=2; discarded: \[(\d+), (\d+), (\d+)\]\)\. Last good checkpoint: "
                     rf"step (\d+) in {re.escape(str(tmp_path / 'checkpoints'))}; no export written$", message)
    assert match, message
    first, last, kept = int(match.group(3)), int(match.group(1)), int(match.group(6))
    assert last == int(match.group(5)) and kept == last - 1 and first >= 2
    # The discarded step's update never happened: its checkpoint holds the previous step's parameters.
    before, after = restored(config, first - 1), restored(config, first)
    jax.tree.map(np.testing.assert_array_equal, after, before)
    steps = [r["step"] for r in train_rows(tmp_path)]
    assert steps == list(range(1, last))  # nothing logged for the step that stopped the run


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, shared_dir) -> Path:
    work = tmp_path_factory.mktemp("tiny_faults")
    cmd = [sys.executable, "-m", "notellm_jax", "prepare", "--config", TINY, "--set", f"paths.work_dir={work}",
           "--set", f"paths.shared_dir={shared_dir}"]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True)
    return work


def _log_logit_scale(checkpoints: Path, step: int) -> float:
    return float(ocp.PyTreeCheckpointer().restore(checkpoints / str(step) / "state")["params"]["log_logit_scale"])


@pytest.mark.slow
def test_learning_rate_1e6_stops_at_the_collapse_naming_a_checkpoint_from_before_it(prepared, shared_dir):
    """stories260K at lr 1e6: the first update after the warm-up step (lr 0) collapses the model (log logit
    scale about -4e5, gradient norm 0) while every value stays finite. The run exits 3 at the first step
    whose metrics show it, names a checkpoint saved before the parameters that step measured, and exports
    nothing."""
    cmd = [sys.executable, "-m", "notellm_jax.train", "--config", TINY,
           *(f"--set={s}" for s in (f"paths.work_dir={prepared}", f"paths.shared_dir={shared_dir}",
                                    "train.learning_rate=1e6", "train.max_steps=8", "train.checkpoint_every=1",
                                    "train.log_every=1", "train.eval_batches=0"))]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr[-3000:]
    ckpt = prepared / "checkpoints"
    match = re.search(r"train: error: step (\d+): (log logit scale \S+ is beyond \+-10 \(train.max_abs_log_logit_scale\)"
                      r"|gradient norm 0 in \d+ consecutive steps|loss \S+ is \S+ x the median)"
                      r".*\. Last good checkpoint: step (\d+) in " + re.escape(str(ckpt)) +
                      r" \(the first anomaly, at step (\d+), measured the parameters step (\d+) produced; "
                      r"not good: checkpoint\(s\) \[([\d, ]+)\]\); no export written$", proc.stderr, re.MULTILINE)
    assert match, proc.stderr[-3000:]
    step, kept, first, measured = (int(match.group(i)) for i in (1, 3, 4, 5))
    later = [int(s) for s in match.group(6).split(", ")]
    assert kept >= 1 and measured == first - 1 and kept == first - 2 and first <= step
    assert later == list(range(kept + 1, step))
    assert not (prepared / "export").exists()
    assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == list(range(1, step))
    # The named checkpoint is sound; the later ones already hold the collapsed model.
    assert abs(_log_logit_scale(ckpt, kept)) < 10 and all(abs(_log_logit_scale(ckpt, s)) > 1e3 for s in later)
    assert [r["step"] for r in train_rows(prepared)] == list(range(1, step))  # nothing logged from the anomaly on
