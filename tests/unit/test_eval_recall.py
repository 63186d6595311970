"""eval.recall on a data folder and embeddings whose answers are known by construction.

Test notes: Q queries, their Q ground truths and some extra notes, random unit vectors in 16-d. A query's
vector is its ground truth's plus tiny noise, so the ground truth is its nearest candidate (R@1 = 1 for
exact search and for ScaNN). With the queries' vectors handed to the wrong queries (a derangement), the
ground truth ranks like a random note: R@1 = 0 and R@k follows a brute-force numpy count.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from notellm_jax.config import load_config
from notellm_jax.data import store
from notellm_jax.infer.embeddings import EmbeddingWriter
from notellm_jax.eval.recall import evaluate_embeddings
from notellm_jax.main import main

if importlib.util.find_spec("scann") is None:  # absent on the GPU machines by design (ENVIRONMENT.md)
    pytest.skip("scann is not installed", allow_module_level=True)

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.py")
Q, EXTRA, DIM = 60, 140, 16


def category(note_id: str) -> str:
    """Two categories by note number; the ground truths of every third pair sit in a third one."""
    kind, number = note_id[0], int(note_id.rsplit("/", 1)[-1].lstrip("qge"))
    return "elsewhere" if kind == "g" and number % 3 == 0 else f"cat{number % 2}"


def write_data(work: Path, test_ids: list[str]) -> None:
    """notes (test notes + 5 training notes), split.json, test pairs (q_i, g_i), PostLinks."""
    data = work / "data"
    data.mkdir(parents=True)
    all_ids = test_ids + [f"train/{i}" for i in range(5)]
    store.write_notes({"note_id": all_ids, "title": ["t"] * len(all_ids), "content": ["c"] * len(all_ids),
                       "topics": [["x"]] * len(all_ids), "category": [category(i) for i in all_ids],
                       "created_at": list(range(len(all_ids))), "exposure": [10 * i for i in range(len(all_ids))]},
                      data / "notes.parquet")
    (data / "split.json").write_text(json.dumps({"test_notes": test_ids, "train_notes": all_ids[len(test_ids):]}))
    store.write_pairs({"note_a": [f"q{i}" for i in range(Q)], "note_b": [f"g{i}" for i in range(Q)],
                       "score": [1.0] * Q}, data / "pairs_test.parquet")
    # 3 links between test notes survive; links touching a training note do not.
    store.write_links({"note_a": ["q0", "q1", "q2", "q3", "train/0"], "note_b": ["g0", "g1", "g2", "train/1", "g4"],
                       "link_type": ["linked"] * 5}, data / "pairs_postlinks.parquet")


def ids_and_vectors(shuffle: bool) -> tuple[list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    g = rng.normal(size=(Q, DIM))
    extra = rng.normal(size=(EXTRA, DIM))
    source = np.roll(np.arange(Q), 1) if shuffle else np.arange(Q)  # a derangement when shuffled
    q = g[source] + 1e-3 * rng.normal(size=(Q, DIM))
    ids = [f"q{i}" for i in range(Q)] + [f"g{i}" for i in range(Q)] + [f"e{i}" for i in range(EXTRA)]
    vectors = np.concatenate([q, g, extra])
    return ids, (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32), source


def write_embeddings(folder: Path, ids: list[str], vectors: np.ndarray) -> Path:
    writer = EmbeddingWriter(folder, shard_size=64)
    writer.add(ids, vectors)
    return writer.close({"model": "constructed"})


def setup_run(tmp_path: Path, shuffle: bool, *overrides: str):
    ids, vectors, source = ids_and_vectors(shuffle)
    write_data(tmp_path, ids)
    config = load_config(TINY, [f"paths.work_dir={tmp_path}", "retrieval.bootstrap_samples=200", *overrides])
    return config, write_embeddings(tmp_path / "emb", ids, vectors), ids, vectors


def test_ground_truth_nearest_gives_recall_one(tmp_path):
    config, emb, _, _ = setup_run(tmp_path, shuffle=False)
    metrics = evaluate_embeddings(config, emb)
    exact = metrics["cooccurrence"]
    assert (exact["pairs_kept"], exact["pool_size"]) == (Q, Q + EXTRA)
    assert all(entry["recall"] == 1.0 for entry in exact["recall"].values())
    assert exact["recall"]["1"]["ci_low"] == 1.0
    within = metrics["cooccurrence"]["within_category"]
    assert (within["queries"], within["excluded_cross_category"]) == (40, 20)  # counted, not judged
    assert within["recall"]["1"]["recall"] == 1.0
    assert exact["exposure"]["low"]["1"]["recall"] == 1.0
    links = metrics["postlinks"]
    assert (links["pairs_in_file"], links["pairs_between_test_notes"], links["pairs_kept"]) == (5, 3, 3)
    assert links["recall"]["1"]["recall"] == 1.0
    scann = metrics["scann"]
    assert scann["params"]["brute_force"]  # a pool this small is scored exactly
    assert scann["recall"]["1"]["recall"] == 1.0
    assert all(v == 1.0 for v in scann["overlap_with_exact"].values())
    assert (Path(scann["index_dir"]) / "scann_assets.pbtxt").is_file()  # saved, then searched reloaded


def test_shuffled_is_chance_and_matches_brute_force(tmp_path):
    # A real tree + asymmetric hashing index; searching every leaf with exact reordering returns exact lists.
    config, emb, ids, vectors = setup_run(tmp_path, True, "retrieval.scann_num_leaves=8",
                                          "retrieval.scann_leaves_to_search=8", "retrieval.scann_reorder=200")
    metrics = evaluate_embeddings(config, emb)
    pool = vectors[Q:]  # every non-query test note; ground truth g_i is pool row i
    scores = vectors[:Q] @ pool.T
    ranks = (scores > scores[np.arange(Q), np.arange(Q)][:, None]).sum(axis=1)
    for k, entry in metrics["cooccurrence"]["recall"].items():
        assert entry["recall"] == pytest.approx(np.mean(ranks < int(k))), k
    assert metrics["cooccurrence"]["recall"]["1"]["recall"] == 0.0
    assert metrics["cooccurrence"]["recall"]["100"]["recall"] == pytest.approx(100 / len(pool), abs=0.15)
    scann = metrics["scann"]
    assert not scann["params"]["brute_force"] and scann["params"]["num_leaves"] == 8
    assert scann["overlap_with_exact"]["100"] >= 0.99
    for k, entry in scann["recall"].items():
        assert entry["recall"] == pytest.approx(np.mean(ranks < int(k)), abs=0.02), k


def test_bad_input_errors(tmp_path):
    config, emb, ids, vectors = setup_run(tmp_path, shuffle=False)
    other = write_embeddings(tmp_path / "other", [f"x{i}" for i in range(len(ids))], vectors)
    with pytest.raises(ValueError, match=r"260 of 260 requested notes have no embedding"):
        evaluate_embeddings(config, other)
    too_big = load_config(TINY, [f"paths.work_dir={tmp_path}", "retrieval.ks=[1, 500]"])
    with pytest.raises(ValueError, match="k=500 is outside 1..200"):
        evaluate_embeddings(too_big, emb)
    (tmp_path / "data" / "split.json").write_text(json.dumps({"test_notes": []}))
    with pytest.raises(ValueError, match="the test set is empty"):
        evaluate_embeddings(config, emb)


def test_cli_writes_metrics(tmp_path, capsys):
    _, emb, _, _ = setup_run(tmp_path, shuffle=False)
    out = tmp_path / "metrics.json"
    main(["recall", "--config", TINY, "--set", f"paths.work_dir={tmp_path}", "--set", "retrieval.bootstrap_samples=50",
          "--embeddings", str(emb), "--name", "oracle", "--out", str(out)])
    metrics = json.loads(out.read_text())
    assert metrics["model"] == "oracle" and metrics["cooccurrence"]["recall"]["1"]["recall"] == 1.0
    assert "R@1=1.000" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["recall", "--config", TINY, "--set", f"paths.work_dir={tmp_path}", "--embeddings", str(tmp_path / "none")])
    assert "notellm recall: error:" in capsys.readouterr().err


def test_cli_pairs_against_another_run(tmp_path, capsys):
    """`--against`: this model minus another run's recall result on the same queries, paired; a result of
    another query list is an error naming the file, never a silent unpaired comparison."""
    from notellm_jax.eval.retrieval import paired_difference

    _, oracle_emb, ids, vectors = setup_run(tmp_path, shuffle=False)
    base = ["recall", "--config", TINY, "--set", f"paths.work_dir={tmp_path}", "--set", "retrieval.bootstrap_samples=50"]
    main(base + ["--embeddings", str(oracle_emb), "--name", "oracle", "--out", str(tmp_path / "oracle.json")])
    _, shuffled, _ = ids_and_vectors(shuffle=True)
    shuffled_emb = write_embeddings(tmp_path / "shuffled", ids, shuffled)
    capsys.readouterr()
    main(base + ["--embeddings", str(shuffled_emb), "--name", "shuffled", "--out", str(tmp_path / "shuffled.json"),
                 "--against", str(tmp_path / "oracle.json")])
    mine = json.loads((tmp_path / "shuffled.json").read_text())
    oracle = json.loads((tmp_path / "oracle.json").read_text())
    (entry,) = mine["paired"]
    assert entry["model"] == "oracle"
    want = paired_difference(mine["cooccurrence"]["ranks"], oracle["cooccurrence"]["ranks"],
                             mine["cooccurrence"]["ks"], samples=50, seed=0)  # retrieval.bootstrap_seed: 0
    assert entry["difference"] == want
    assert entry["difference"]["1"] == {"difference": -1.0, "ci_low": -1.0, "ci_high": -1.0, "queries": Q, "seeds": 1}
    assert "shuffled minus oracle" in capsys.readouterr().out

    oracle["cooccurrence"]["queries_digest"] = "another"
    (tmp_path / "other.json").write_text(json.dumps(oracle))
    with pytest.raises(SystemExit):
        main(base + ["--embeddings", str(shuffled_emb), "--against", str(tmp_path / "other.json")])
    err = capsys.readouterr().err
    assert "other.json cannot be paired" in err and "another query list" in err
