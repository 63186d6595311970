"""Multi-host training proven on one machine.

* Two JAX processes on loopback (gloo collectives), two fake CPU devices each, started by
  `launch/local_multiprocess.sh`, train the tiny config on real prepared Stack Exchange shards (each process
  reads only its own pair files), checkpoint from both processes into one folder and export. The losses of
  every step and the final parameters must equal one process with four devices stepping on the same global
  batch (the two hosts' batches, built with the pipeline for process_index 0 and 1, concatenated).
* A checkpoint written on an 8-way fsdp mesh is restored onto a 2 x 4 data x fsdp mesh and training goes
  on exactly as the run that never changed mesh.
* The synthetic batches (performance runs) form the same global batch whatever the process count.
* `cluster_from_env` accepts consistent environments and names the variables of inconsistent ones.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from notellm_jax.train import trainer
from notellm_jax.data.input_pipeline import synthetic_batches
from notellm_jax.model.params import merge_params
from notellm_jax.model.batch import STEP_KEYS
from notellm_jax.train.checkpointing import checkpoint_manager
from notellm_jax.train.step import TrainSetup, TrainState, compile_steps, create_state, make_train_setup, to_global_batch
from notellm_jax.weights.loading import load_initial_params
from notellm_jax.weights.tokenizer import resolve_tokenizer
from notellm_jax.config import Config, load_config
from notellm_jax.distributed import ClusterSpec, cluster_from_env
from notellm_jax.model.families import preset
from notellm_jax.sharding import make_mesh

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "launch" / "local_multiprocess.sh"
TINY = str(REPO / "configs" / "tiny.py")
STEPS = 3
# One small site and short prompts keep data preparation and compilation to seconds. Warmup 0 and a small
# learning rate so every step moves the weights without the run diverging.
DATA = ['data.sites=["coffee.stackexchange.com"]', "data.num_shards=2", "prompt.max_length=176",
        "prompt.title_max_tokens=8", "prompt.content_max_tokens=16", "prompt.max_targets=16"]
TRAIN = [f"train.max_steps={STEPS}", "train.log_every=1", "train.checkpoint_every=2", "train.keep_checkpoints=5",
         "train.eval_batches=0", "train.warmup_fraction=0", "train.learning_rate=1e-3", "train.async_checkpoint=false",
         "mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1"]
# Same tolerances as tests/test_train_sharding.py: fp32 on CPU, where the runs differ only in how sums are
# ordered (gloo all-reduce across processes vs in-process); Adam's division by sqrt(nu) amplifies rounding
# where a first moment nearly cancels, so weights are compared through their update by relative L2.
# Metrics get 1e-4 (measured: 2.1e-5 on the step-3 grad_norm across processes); a wrong batch or a missing
# all-reduce moves them by percents.
METRIC_RTOL = 1e-4
UPDATE_REL_L2 = 2e-3
COMPARED_METRICS = ("loss", "loss_cl", "loss_gen", "accuracy", "grad_norm", "log_logit_scale")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def relative_l2(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def assert_same_updates(got: dict, want: dict, start: dict) -> None:
    """got - start and want - start agree per tensor (relative L2), and the update is not vacuous."""
    for (path, g), (_, w), (_, s) in zip(jax.tree_util.tree_leaves_with_path(host(got)),
                                         jax.tree_util.tree_leaves_with_path(host(want)),
                                         jax.tree_util.tree_leaves_with_path(host(start)), strict=True):
        name = jax.tree_util.keystr(path)
        want_update = np.asarray(w, np.float64) - s
        assert np.linalg.norm(want_update) > 0, f"{name} did not move: the comparison would be vacuous"
        assert relative_l2(np.asarray(g, np.float64) - s, want_update) <= UPDATE_REL_L2, name


def train_metrics(work_dir: Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in (work_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in lines if row["split"] == "train"]
    steps = [row["step"] for row in rows]
    assert len(steps) == len(set(steps)), f"steps logged twice (more than one process wrote logs): {steps}"
    return {row["step"]: row for row in rows}


def checkpoint_state(config: Config, spec: TrainSetup, step: int) -> TrainState:
    """Checkpoint `step` of the run `config` describes, restored onto `spec`'s mesh."""
    import orbax.checkpoint as ocp
    manager = checkpoint_manager(config)
    try:
        return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(spec.abstract_state)))[
            "state"]
    finally:
        manager.close()


def launch(args: list[str], log_dir: Path, timeout: float = 400) -> None:
    """Run the launcher in its own process group; on timeout the whole group is killed."""
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.Popen(["bash", str(LAUNCHER), *args], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{LAUNCHER.name} did not finish in {timeout} s; logs in {log_dir}")
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(log_dir.glob("*.log")))
    assert proc.returncode == 0, f"{out}\n{logs}"


# --------------------------------------------------------------------------------------------------
# 2 processes x 2 devices == 1 process x 4 devices, on the real pipeline


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, shared_dir) -> Config:
    """Tiny prepared data (one Stack Exchange site, two pair files) under a fresh work dir."""
    from notellm_jax.data import prepare
    work = tmp_path_factory.mktemp("multiprocess")
    config = load_config(TINY, [*DATA, *TRAIN, f"paths.shared_dir={shared_dir}", f"paths.work_dir={work}"])
    prepare.prepare(config)
    return config


def reference_run(config: Config) -> tuple[list[dict], TrainSetup, TrainState, dict]:
    """One process, 4 devices, fed the global batch the two hosts form (each host's pipeline shard)."""
    from notellm_jax.data import input_pipeline
    emb_vocab = resolve_tokenizer(config).vocab_size
    params, llama_cfg = load_initial_params(config, emb_vocab)
    spec = make_train_setup(config, llama_cfg, make_mesh(1, 4, 1, devices=jax.devices()[:4]), STEPS)
    state = create_state(spec, params)
    initial = host(state.params)
    step_fn, _ = compile_steps(spec)
    hosts = [input_pipeline.make_train_dataset(config, config.data_dir, "train", process_index=h,
                                               process_count=2) for h in range(2)]
    history = []
    for _ in range(STEPS):
        local = [next(stream) for stream in hosts]
        assert not np.array_equal(local[0]["note_index"], local[1]["note_index"])
        batch = {k: np.concatenate([part[k] for part in local]) for k in STEP_KEYS if k in local[0]}
        state, metrics = step_fn(state, to_global_batch(spec, batch))
        history.append({k: float(v) for k, v in host(metrics).items()})
    return history, spec, state, initial


@pytest.mark.slow
def test_two_processes_train_like_one_process(prepared, tmp_path):
    config = prepared
    overrides = [*DATA, *TRAIN, f"paths.shared_dir={config.paths.shared_dir}", f"paths.work_dir={config.work_dir}"]
    launch(["-n", "2", "-d", "2", "-p", str(free_port()), "-l", str(tmp_path), "--", "--config", TINY,
            *[arg for o in overrides for arg in ("--set", o)]], tmp_path)

    history, spec, reference, initial = reference_run(config)
    logged = train_metrics(config.work_dir)
    assert sorted(logged) == list(range(1, STEPS + 1))
    for step, want in enumerate(history, start=1):
        for key in COMPARED_METRICS:
            np.testing.assert_allclose(logged[step][key], want[key], rtol=METRIC_RTOL, err_msg=f"step {step} {key}")

    # Both processes wrote one checkpoint (periodic at 2, final at 3); it restores onto one process.
    assert sorted(int(p.name) for p in (config.work_dir / "checkpoints").iterdir()) == [2, STEPS]
    final = checkpoint_state(config, spec, STEPS)
    assert int(final.step) == STEPS
    assert_same_updates(final.params, reference.params, initial)

    # The export, gathered from both processes, holds exactly the final checkpoint's weights.
    from notellm_jax.weights.export import load_notellm
    exported = load_notellm(config.work_dir / "export").params
    jax.tree.map(np.testing.assert_array_equal, exported, host(merge_params(final.params, final.frozen)))


# --------------------------------------------------------------------------------------------------
# Restore onto another mesh shape


def synthetic_config(work_dir: Path, data: int, fsdp: int) -> Config:
    return load_config(TINY + ":random", [
        "train.synthetic_data=true", "prompt.max_length=32", "prompt.max_targets=4", "train.batch_pairs=8",
        "train.max_steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=5", "train.log_every=1",
        "train.async_checkpoint=false", "train.warmup_fraction=0", f"mesh.data={data}", f"mesh.fsdp={fsdp}",
        "mesh.tensor=1", f"paths.work_dir={work_dir}"])


@pytest.mark.slow
def test_checkpoint_restores_onto_another_mesh_and_training_continues(tmp_path):
    """8-way fsdp run to step 4 (checkpoints at 2 and 4); a 2 x 4 run resumes from its step-2 checkpoint."""
    first = synthetic_config(tmp_path / "fsdp8", 1, 8)
    trainer.train(first)
    second = synthetic_config(tmp_path / "data2_fsdp4", 2, 4)
    shutil.copytree(first.work_dir / "checkpoints" / "2", second.work_dir / "checkpoints" / "2")
    trainer.train(second)

    want, got = train_metrics(first.work_dir), train_metrics(second.work_dir)
    assert sorted(got) == [3, 4], "the second run must resume at step 2, not start over"
    for step in (3, 4):
        for key in COMPARED_METRICS:
            np.testing.assert_allclose(got[step][key], want[step][key], rtol=METRIC_RTOL, err_msg=f"{step} {key}")

    params, llama_cfg = load_initial_params(second, None)
    spec = make_train_setup(second, llama_cfg, make_mesh(2, 4, 1), 4)
    restored = checkpoint_state(second, spec, 2)
    for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(spec.state_shardings), strict=True):
        assert leaf.sharding == sharding  # laid out for the 2 x 4 mesh, not the mesh it was written on
    assert_same_updates(checkpoint_state(second, spec, 4).params, checkpoint_state(first, spec, 4).params,
                        restored.params)


# --------------------------------------------------------------------------------------------------
# Synthetic batches and the cluster environment


@pytest.mark.parametrize("process_count", [2, 4])
def test_synthetic_hosts_form_the_single_process_global_batch(process_count):
    config = load_config(TINY + ":random", ["train.synthetic_data=true", "prompt.max_length=16",
                                            "prompt.max_targets=4", "train.batch_pairs=8"])
    llama_cfg = preset("stories260k")
    b = 8 // process_count
    for step in (0, 5):
        whole = next(synthetic_batches(config, llama_cfg, step, process_index=0, process_count=1))
        parts = [next(synthetic_batches(config, llama_cfg, step, process_index=h,
                                                process_count=process_count)) for h in range(process_count)]
        # One host lays out [a_0..a_7, b_0..b_7]; host h [a_hb..a_hb+b-1, b_hb..]: sort by (side, pair).
        pair = np.concatenate([part["pair_id"] for part in parts])
        side = np.tile(np.repeat([0, 1], b), process_count)
        order = np.lexsort((pair, side))
        np.testing.assert_array_equal(pair[order], np.tile(np.arange(8), 2))
        for key, value in whole.items():
            joined = np.concatenate([part[key] for part in parts])
            np.testing.assert_array_equal(joined[order], value, err_msg=f"step {step} {key}")
    other = next(synthetic_batches(config, llama_cfg, 1, process_index=0, process_count=1))
    assert not np.array_equal(other["input_ids"], whole["input_ids"])


SLURM_TASK = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_STEP_NUM_NODES": "2"}
EXPLICIT = {"NOTELLM_COORDINATOR": "node1:1234", "NOTELLM_NUM_PROCESSES": "2", "NOTELLM_PROCESS_ID": "1"}


@pytest.mark.parametrize("env, want", [
    ({}, ClusterSpec("single")),
    (EXPLICIT, ClusterSpec("explicit", "node1:1234", 2, 1)),
    ({**EXPLICIT, **SLURM_TASK}, ClusterSpec("explicit", "node1:1234", 2, 1)),
    ({"NOTELLM_DISTRIBUTED": "auto", **SLURM_TASK}, ClusterSpec("auto")),
    ({"NOTELLM_DISTRIBUTED": "auto", **SLURM_TASK, "SLURM_GPUS_ON_NODE": "8", "JAX_LOCAL_DEVICE_IDS": "0,1"},
     ClusterSpec("auto")),
])
def test_consistent_environments(env, want):
    assert cluster_from_env(env) == want


@pytest.mark.parametrize("env, message", [
    ({"NOTELLM_COORDINATOR": "h:1", "NOTELLM_PROCESS_ID": "0"}, "NOTELLM_NUM_PROCESSES missing"),
    ({**EXPLICIT, "NOTELLM_PROCESS_ID": "2"}, r"NOTELLM_PROCESS_ID=2 is outside \[0, NOTELLM_NUM_PROCESSES=2\)"),
    ({**EXPLICIT, "NOTELLM_NUM_PROCESSES": "two"}, "NOTELLM_NUM_PROCESSES='two' is not an integer"),
    ({**EXPLICIT, "NOTELLM_COORDINATOR": "node1"}, "NOTELLM_COORDINATOR='node1' is not host:port"),
    ({**EXPLICIT, "NOTELLM_DISTRIBUTED": "auto"}, "choose auto-detection or the explicit variables"),
    ({"NOTELLM_DISTRIBUTED": "yes"}, "the only value is 'auto'"),
    ({**EXPLICIT, **SLURM_TASK, "SLURM_NTASKS": "4"}, "NOTELLM_NUM_PROCESSES=2 contradicts SLURM_NTASKS=4"),
    ({**EXPLICIT, **SLURM_TASK, "SLURM_PROCID": "0"}, "NOTELLM_PROCESS_ID=1 contradicts SLURM_PROCID=0"),
    ({"NOTELLM_DISTRIBUTED": "auto", **SLURM_TASK, "SLURM_GPUS_ON_NODE": "8"}, "one task per node"),
])
def test_inconsistent_environments_are_named(env, message):
    with pytest.raises(ValueError, match=message):
        cluster_from_env(env)


# --------------------------------------------------------------------------------------------------
# Embedding across hosts: each process embeds its share of the notes and writes its own shards


@pytest.mark.slow
def test_two_processes_embed_the_files_one_process_writes(tmp_path, shared_dir):
    """2 processes x 2 devices (`notellm embed` through the launcher) write the same shard files,
    ids and (to float tolerance) vectors as one process with 4 devices; each process wrote its own blocks."""
    from notellm_jax.data import store
    from notellm_jax.infer.embed import embed_notes
    from notellm_jax.infer.embeddings import read_embeddings_meta
    from notellm_jax.weights.export import save_notellm

    overrides = [f"paths.work_dir={tmp_path / 'run'}", f"paths.shared_dir={shared_dir}", "embed.batch_size=4",
                 "embed.shard_size=3", "embed.length_buckets=2", "mesh.fsdp=-1"]
    config = load_config(TINY, overrides)
    params, llama_cfg = load_initial_params(config, resolve_tokenizer(config).vocab_size)
    export = save_notellm(tmp_path / "export", params, llama_cfg, config)
    words = "water ground beans roast grinder kettle filter espresso milk".split()
    notes = [{"note_id": f"n{i}", "title": f"How long to brew {words[i % 9]}?", "content": " ".join(words[:i % 9]),
              "topics": ["brewing"], "category": "coffee", "created_at": i, "exposure": 1} for i in range(14)]
    config.data_dir.mkdir(parents=True)
    store.write_notes(notes, config.data_dir / "notes.parquet")

    one = embed_notes(config, export, store.load_notes(config.data_dir / "notes.parquet"), tmp_path / "one",
                      mesh=make_mesh(1, 4, 1, devices=jax.devices()[:4]))
    launch(["-n", "2", "-d", "2", "-p", str(free_port()), "-l", str(tmp_path / "logs"), "-m",
            "notellm_jax", "--", "embed", "--config", TINY, *[arg for o in overrides for arg in ("--set", o)],
            "--checkpoint", str(export), "--split", "all", "--out", str(tmp_path / "two")], tmp_path / "logs")
    two = tmp_path / "two"
    want, got = read_embeddings_meta(one), read_embeddings_meta(two)
    assert got["processes"] == 2 and got["count"] == want["count"] == 14 and len(want["shards"]) == 5
    assert got["shards"] == want["shards"]  # same file names and row counts, in the same order
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in Path(one).iterdir())
    for shard in want["shards"]:
        assert (two / shard["ids"]).read_text() == (Path(one) / shard["ids"]).read_text()
        np.testing.assert_allclose(np.load(two / shard["embeddings"]), np.load(Path(one) / shard["embeddings"]),
                                   atol=1e-5, rtol=0)
    for process, blocks in ((0, [0, 2, 4]), (1, [1, 3])):
        assert f"process {process}/2: wrote shards {blocks}" in (tmp_path / "logs" / f"process_{process}.log").read_text()
