"""The sweep tool (validation pairs only) and the accelerator recipe's device command, in a tiny CPU mode on
the real tiny data (stories260K, four small Stack Exchange sites); the weight packer on the real SmolLM2 GGUF."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import notellm_jax  # noqa: F401
from notellm_jax.config import load_config, override

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.py")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, shared_dir) -> Path:
    work = tmp_path_factory.mktemp("tiny_tools")
    cmd = [sys.executable, "-m", "notellm_jax", "prepare", "--config", TINY, "--set", f"paths.work_dir={work}",
           "--set", f"paths.shared_dir={shared_dir}"]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True)
    return work


def tiny(work: Path, shared_dir: Path):
    return override(load_config(TINY), {"paths.work_dir": str(work), "paths.data_dir": str(work / "data"),
                                        "paths.shared_dir": str(shared_dir), "train.eval_batches": 1})


@pytest.mark.slow
def test_sweep_scores_two_settings_on_validation_pairs(prepared, shared_dir, tmp_path, monkeypatch):
    from notellm_jax.tools import sweep as sweep_module
    from notellm_jax.tools.sweep import sweep

    grid = {"train.learning_rate": [3e-3], "prompt.content_max_tokens": [24, 32]}  # 32 = the base's budget
    rows = sweep(tiny(prepared, shared_dir), grid, tmp_path / "sweep", steps=2, mode="product")
    assert len(rows) == 2 and [r["val_loss_cl"] for r in rows] == sorted(r["val_loss_cl"] for r in rows)
    assert all(np.isfinite(r["val_loss_cl"]) and 0 <= r["val_accuracy"] <= 1 for r in rows)
    assert rows[0]["val_loss_cl"] != rows[1]["val_loss_cl"]  # the settings really differ
    table = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert table["split"] == "val" and len(table["rows"]) == 2
    assert "content_max_tokens=24" in (tmp_path / "sweep" / "sweep.md").read_text()
    assert len(list((tmp_path / "sweep").glob("data-*/shards/tokens.npz"))) == 1  # only the 24-token budget
    assert not list((tmp_path / "sweep").glob("setting-*/export"))

    trained, real_run_setting = [], sweep_module.run_setting

    def counting(base, updates, *args):
        trained.append(updates)
        return real_run_setting(base, updates, *args)

    monkeypatch.setattr(sweep_module, "run_setting", counting)  # a rerun resumes from sweep.json
    assert sweep(tiny(prepared, shared_dir), grid, tmp_path / "sweep", steps=2, mode="product") == rows
    assert trained == []
    grown = {**grid, "train.learning_rate": [3e-3, 1e-3]}  # one more value: only its settings train
    assert len(sweep(tiny(prepared, shared_dir), grown, tmp_path / "sweep", steps=2, mode="product")) == 4
    assert sorted(t["prompt.content_max_tokens"] for t in trained) == [24, 32]
    assert all(t["train.learning_rate"] == 1e-3 for t in trained)


LEVERS = ("model.prefix_bidirectional=true", "model.pooling=attention", "train.batch_by_category=true",
          "data.train_input=numpy")


@pytest.mark.slow
@pytest.mark.parametrize("levers", [(), LEVERS], ids=["paper", "levers"])
def test_device_recipe_runs_without_tensorflow_and_its_embeddings_score_here(prepared, shared_dir, tmp_path, levers):
    from notellm_jax.data.store import split_note_ids
    from notellm_jax.infer.embeddings import read_embeddings
    from notellm_jax.eval.recall import evaluate_embeddings
    from notellm_jax.tools.device_recipe import pack

    config = tiny(prepared, shared_dir)
    bundle = tmp_path / "bundle"
    packed = pack(override(config, {"train.batch_by_category": bool(levers)}), bundle)
    notes = {"data/notes.parquet"} if levers else set()
    assert set(packed["files"]) == {"data/shards/meta.json", "data/shards/tokens.npz", "data/split.json"} | notes
    extra = "".join(f", '--set', {item!r}" for item in levers)
    code = ("import sys; sys.modules['tensorflow'] = None; sys.modules['gguf'] = None\n"
            "from notellm_jax.main import main\n"
            f"main(['device', 'run', '--config', {TINY!r}, '--bundle', {str(bundle)!r},"
            f" '--out', {str(tmp_path / 'out')!r},"
            f" '--set', 'paths.shared_dir={config.paths.shared_dir}', '--set', 'train.max_steps=3',"
            f" '--set', 'train.eval_batches=1'{extra}])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["last_metrics"]["loss_cl"] > 0 and summary["seconds"]["train"] > 0
    ids, vectors = read_embeddings(tmp_path / "out" / "embeddings" / "notellm")
    test_ids = split_note_ids(config.data_dir, "test")
    assert set(ids) <= set(test_ids) and len(ids) > 0.9 * len(test_ids)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    metrics = evaluate_embeddings(config, tmp_path / "out" / "embeddings" / "notellm")
    assert metrics["cooccurrence"]["pairs_kept"] > 0


@pytest.mark.slow
def test_packed_gguf_reads_back_with_numpy_as_the_gguf_reader_does(smollm2_gguf, tmp_path):
    from notellm_jax.weights.formats import read_state
    from notellm_jax.weights.packed import pack_gguf, read_packed

    folder = pack_gguf(smollm2_gguf, tmp_path / "packed", part_bytes=40 * 2**20)
    parts = sorted(folder.glob("part-*.bin"))
    assert len(parts) == 3 and max(p.stat().st_size for p in parts) <= 40 * 2**20
    state, config = read_packed(folder)
    want_state, want_config = read_state(smollm2_gguf)
    assert config == want_config and state.keys() == want_state.keys()
    for name, want in want_state.items():
        np.testing.assert_array_equal(state[name], want, err_msg=name)
