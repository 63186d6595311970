"""`job.seeds`: the tiny recipe for two seeds with BM25, on real Stack Exchange data (four small sites).

Each seed trains in its own work dir with its own seed and data; BM25 (no seed changes it) runs once; the
report pools the seeds per site group (checked against each seed's recall result in numpy); a second
invocation finds every output and redoes nothing."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.py")


@pytest.mark.slow
def test_two_seeds_with_bm25_pool_and_resume(tmp_path, shared_dir):
    from notellm_jax.main import main
    work = tmp_path / "job"
    overrides = [f"paths.work_dir={work}", f"paths.shared_dir={shared_dir}", "train.epochs=1", "train.log_every=4",
                 "train.eval_batches=1", 'job.train_variants=["gcl_only"]', 'job.baselines=["bm25"]', "job.seeds=2",
                 "retrieval.bootstrap_samples=50"]
    argv = ["job", "--config", TINY] + [a for o in overrides for a in ("--set", o)]
    main(argv)
    seed1 = work / "seeds" / "1"
    assert json.loads((seed1 / "models" / "gcl_only" / "config.json").read_text())["train"]["seed"] == 1
    assert json.loads((work / "models" / "gcl_only" / "config.json").read_text())["train"]["seed"] == 0
    assert (seed1 / "data" / "feature_cache").resolve() == (work / "data" / "feature_cache").resolve()
    assert (work / "eval" / "bm25.recall.json").is_file() and not (seed1 / "eval" / "bm25.recall.json").exists()

    results = [json.loads((w / "eval" / "gcl_only.recall.json").read_text())["cooccurrence"] for w in (work, seed1)]
    assert results[0]["queries_digest"] == results[1]["queries_digest"]
    assert {"all", "seen", "unseen"} == set(results[0]["groups"])  # coffee was seen; gadgets, genai, htw not
    metrics = json.loads((work / "report" / "metrics.json").read_text())
    unseen = metrics["seeds"]["groups"]["unseen"]
    mask = np.array([s in ("gadgets", "genai", "htw") for s in results[0]["query_sites"]])
    per_seed = [(np.asarray(r["ranks"])[mask] < 10).mean() for r in results]
    k10 = metrics["seeds"]["ks"].index(10)
    assert [s[k10] for s in unseen["models"]["gcl_only"]["per_seed"]] == pytest.approx(per_seed)
    assert unseen["models"]["gcl_only"]["sd"][k10] == pytest.approx(np.std(per_seed, ddof=1))
    assert unseen["differences"]["bm25"]["10"]["seeds"] == 2
    report = (work / "report" / "report.md").read_text()
    assert "## Seeds" in report and report.index("**unseen** sites") < report.index("**all** sites")

    before = [p.stat().st_mtime_ns for p in (work / "eval" / "gcl_only.recall.json", seed1 / "eval" / "gcl_only.recall.json")]
    again = main(argv + ["--only", "train,embed,recall"])
    assert again["stages"] == {}
    assert [p.stat().st_mtime_ns for p in (work / "eval" / "gcl_only.recall.json",
                                           seed1 / "eval" / "gcl_only.recall.json")] == before
