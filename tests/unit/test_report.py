"""The report from hand-made result files: every number in its tables is the one in the inputs, formatted
as percentages with their intervals; missing results are an error naming the models."""
import json

import pytest

from notellm_jax.config import Config, override
from notellm_jax.errors import MissingInputError
from notellm_jax.job.report import write_report


def recall_result(r1: float, r10: float) -> dict:
    table = {"1": {"recall": r1, "ci_low": r1 - 0.01, "ci_high": r1 + 0.01},
             "10": {"recall": r10, "ci_low": r10 - 0.02, "ci_high": r10 + 0.03},
             "3": {"recall": 0.5, "ci_low": 0.4, "ci_high": 0.6}}
    section = {"recall": table, "ks": [1, 10], "paper_ks": {"0.004": 3}, "test_notes": 40, "pairs_kept": 12,
               "pairs_read": 30, "pool_size": 28, "exposure": {"low": {"10": table["10"]}, "high": {"10": table["1"]}},
               "within_category": {"recall": {"10": table["10"]}}}
    return {"cooccurrence": section, "postlinks": {**section, "recall": {"10": table["1"]}}}


@pytest.fixture
def run(tmp_path):
    config = override(Config(name="unit"), {"paths.work_dir": str(tmp_path), "retrieval.ks": (1, 10),
                                            "job.train_variants": ("notellm",), "job.baselines": ("sbert_zeroshot",)})
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "notellm.recall.json").write_text(json.dumps(recall_result(0.125, 0.5)))
    (tmp_path / "eval" / "sbert_zeroshot.recall.json").write_text(json.dumps(recall_result(0.25, 0.75)))
    logs = tmp_path / "models" / "notellm" / "logs"
    logs.mkdir(parents=True)
    rows = [{"step": s, "split": "train", "loss": 2.0 / s, "loss_cl": 3.0 / s, "loss_gen": 5.0 / s, "accuracy": 0.1 * s,
             "step_time_s": 0.5, "tokens_per_s": 1000.0, "mfu": 0.25} for s in (1, 2, 4)]
    rows.append({"step": 4, "split": "val", "loss_cl": 0.9})
    (logs / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    gen = tmp_path / "eval" / "generation" / "notellm"
    gen.mkdir(parents=True)
    (gen / "metrics.json").write_text(json.dumps({"notes": 6, "category": {"accuracy": 0.5, "illusory": 1 / 6}}))
    invocations = [{"started": "2026-12-01T10:00:00+00:00", "commit": "aaa1111", "stages": {"prepare": 3.0,
                    "train notellm": 12.5, "report": 0.5}, "skipped": [], "wall_s": 16.0},
                   {"started": "2026-12-02T10:00:00+00:00", "commit": "bbb2222", "stages": {"report": 0.7},
                    "skipped": ["prepare", "train notellm"], "wall_s": 0.9}]
    (tmp_path / "timings.json").write_text(json.dumps({"invocations": invocations}))
    return config


def test_tables_carry_the_input_numbers(run):
    out = write_report(run, {"notellm": "NoteLLM", "sbert_zeroshot": "SBERT"}, ("notellm",))
    report = (out / "report.md").read_text()
    assert "| NoteLLM | 12.5 [11.5, 13.5] | 50.0 [48.0, 53.0] | 50.0 [40.0, 60.0] | 50.0 |" in report
    assert "| SBERT | 25.0 [24.0, 26.0] | 75.0 [73.0, 78.0] |" in report
    assert "| NoteLLM | 6 | 50.0 | 16.7 |" in report                       # generation: Acc., Ill.
    assert "| NoteLLM | 4 | 3.000 → 0.750 | 5.000 → 1.250 | 0.900 | 0.50 | 1000 | 25.0% |" in report
    # Wall time: each stage's latest real run (a later skip records no time), then every invocation.
    assert "| train notellm | 12.5 | 2026-12-01T10:00:00+00:00 | aaa1111 |" in report
    assert "| report | 0.7 | 2026-12-02T10:00:00+00:00 | bbb2222 |" in report
    assert "| 2026-12-02T10:00:00+00:00 | bbb2222 | report 0.7 | prepare, train notellm | 0.9 |" in report
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["recall"]["sbert_zeroshot"]["cooccurrence"]["recall"]["10"]["recall"] == 0.75
    assert metrics["timings"]["latest"]["prepare"] == {"seconds": 3.0, "started": "2026-12-01T10:00:00+00:00",
                                                       "commit": "aaa1111"}


def test_training_row_of_a_variant_without_generation_loss(run, tmp_path):
    """A gcl_only run logs no train loss_gen (its step skips the head): its row says so, the others are kept."""
    logs = tmp_path / "models" / "notellm" / "logs"
    rows = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    (logs / "metrics.jsonl").write_text("\n".join(json.dumps({k: v for k, v in r.items() if k != "loss_gen"})
                                                  for r in rows))
    report = (write_report(run, {"notellm": "NoteLLM"}, ("notellm",)) / "report.md").read_text()
    assert "| NoteLLM | 4 | 3.000 → 0.750 | not computed | 0.900 | 0.50 | 1000 | 25.0% |" in report


def test_paired_difference_table_from_per_query_ranks(run, tmp_path):
    """With per-query ranks from the same queries, the report adds NoteLLM minus each model with a paired
    interval (numbers recomputed here with numpy); a model without them is named, not silently dropped."""
    import numpy as np

    from notellm_jax.eval.retrieval import bootstrap_interval

    ranks_a, ranks_b = [0, 0, 3, 20, 0, 9, 40, 0], [5, 0, 30, 20, 0, 0, 40, 12]
    for name, ranks in (("notellm", ranks_a), ("sbert_zeroshot", ranks_b)):
        path = tmp_path / "eval" / f"{name}.recall.json"
        result = json.loads(path.read_text())
        result["cooccurrence"].update(ranks=ranks, queries_digest="q1")
        path.write_text(json.dumps(result))
    report = (write_report(run, {"notellm": "NoteLLM", "sbert_zeroshot": "SBERT"}, ()) / "report.md").read_text()
    a, b = np.array(ranks_a), np.array(ranks_b)
    cells = []
    for k in (1, 10):
        diff = (a < k).astype(float) - (b < k)
        low, high = bootstrap_interval(diff[:, None], run.retrieval.bootstrap_samples, run.retrieval.bootstrap_seed)[:, 0]
        cells.append(f"{100 * diff.mean():+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]")
    assert "NoteLLM minus each model" in report
    assert f"| SBERT | {cells[0]} | {cells[1]} |" in report
    assert cells[0].startswith("+12.5")  # R@1: 4/8 hits against 3/8

    other = tmp_path / "eval" / "sbert_zeroshot.recall.json"
    result = json.loads(other.read_text())
    result["cooccurrence"]["queries_digest"] = "another query list"
    other.write_text(json.dumps(result))
    report = (write_report(run, {"notellm": "NoteLLM", "sbert_zeroshot": "SBERT"}, ()) / "report.md").read_text()
    assert "Not paired (no per-query ranks from the same queries; rerun the recall stage): SBERT." in report
    assert "| SBERT | +" not in report


def test_missing_results_name_the_models(run, tmp_path):
    (tmp_path / "eval" / "sbert_zeroshot.recall.json").unlink()
    with pytest.raises(MissingInputError, match="sbert_zeroshot"):
        write_report(run, {}, ())


def test_a_timings_file_from_before_per_invocation_records_reads_as_one_merged_record(run, tmp_path):
    (tmp_path / "timings.json").write_text(json.dumps({"prepare": 0.0, "train notellm": 12.5}))
    report = (write_report(run, {"notellm": "NoteLLM"}, ("notellm",)) / "report.md").read_text()
    assert "| train notellm | 12.5 | unknown | unknown |" in report
    assert "| unknown (merged before per-invocation records) | unknown | prepare, train notellm |" in report


def test_git_commit_names_the_checkout_and_marks_a_modified_one(tmp_path, monkeypatch):
    import shutil
    import subprocess

    from notellm_jax.job.report import git_commit

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # git looks no further up than tmp_path
    (tmp_path / "plain").mkdir()
    assert git_commit(tmp_path / "plain") == "unknown"  # not a git checkout
    tmp_path = tmp_path / "repo"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "a.txt").write_text("one")
    subprocess.run(git + ["add", "a.txt"], cwd=tmp_path, check=True)
    subprocess.run(git + ["commit", "-qm", "first"], cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True, text=True,
                          check=True).stdout.strip()
    (tmp_path / "untracked.txt").write_text("x")
    assert git_commit(tmp_path) == head  # untracked files do not count
    (tmp_path / "a.txt").write_text("two")
    assert git_commit(tmp_path) == head + "-dirty"
