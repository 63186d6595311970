"""README.md's "Train on your own data" section is the example in examples/, and its commands run as written.

The section lies between `<!-- own-data:begin -->` and `<!-- own-data:end -->`. Its two ```json lines must be
the first lines of examples/data/notes.jsonl and events.jsonl, its ```python block must be examples/my_data.py,
and every line of its ```bash block runs, split by shlex, from the repository root (the `notellm` console script
of the repository's .venv, as a newcomer would run it); then the outputs each command promises are checked.
"""
import json
import math
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from notellm_jax.config import load_config
from notellm_jax.data.importers import import_source

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_DATA = REPO / "examples" / "data"
EXAMPLE_CONFIG = "examples/my_data.py"
BEGIN, END = "<!-- own-data:begin -->", "<!-- own-data:end -->"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def readme_blocks() -> dict[str, list[str]]:
    """The fenced blocks of README.md's own-data section by language, in order of appearance."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert text.count(BEGIN) == 1 and text.count(END) == 1, f"README.md needs one {BEGIN} ... {END} section"
    section = text.split(BEGIN)[1].split(END)[0]
    assert section.lstrip().startswith("## Train on your own data")
    blocks: dict[str, list[str]] = {}
    for language, body in FENCE.findall(section):
        blocks.setdefault(language, []).append(body)
    assert sorted((k, len(v)) for k, v in blocks.items()) == [("bash", 1), ("json", 2), ("python", 1)], blocks.keys()
    return blocks


def readme_commands() -> list[list[str]]:
    return [argv for line in readme_blocks()["bash"][0].splitlines() if (argv := shlex.split(line, comments=True))]


@pytest.fixture
def example_config(monkeypatch):
    """examples/my_data.py as the CLI loads it, from the repository root (its paths are relative to it)."""
    monkeypatch.chdir(REPO)
    return load_config(EXAMPLE_CONFIG)


def test_readme_json_lines_are_the_example_files_first_lines():
    notes_line, events_line = (block.rstrip("\n") for block in readme_blocks()["json"])
    for shown, name in ((notes_line, "notes.jsonl"), (events_line, "events.jsonl")):
        assert "\n" not in shown, f"the README's {name} example is one line"
        assert shown == (EXAMPLE_DATA / name).read_text(encoding="utf-8").splitlines()[0], name
        assert isinstance(json.loads(shown), dict)


def test_readme_config_is_examples_my_data_py():
    shown = readme_blocks()["python"][0]
    assert shown.rstrip("\n") == (REPO / EXAMPLE_CONFIG).read_text(encoding="utf-8").rstrip("\n")


def test_readme_commands_use_the_example_config():
    commands = readme_commands()
    assert [argv[1] for argv in commands] == ["prepare", "train", "embed", "recall"]
    for argv in commands:
        assert argv[argv.index("--config") + 1] == EXAMPLE_CONFIG, argv


def test_example_data_imports_with_nothing_skipped(example_config, tmp_path):
    """The generic JSONL importer takes every line of the example, the README's two lines included."""
    config = example_config
    assert (config.data.source, config.resolve(config.data.input_path)) == ("generic", EXAMPLE_DATA)
    counts = import_source(config, tmp_path)
    lines = {name: len((EXAMPLE_DATA / name).read_text(encoding="utf-8").splitlines())
             for name in ("notes.jsonl", "events.jsonl")}
    assert counts["notes_written"] == counts["notes_read"] == lines["notes.jsonl"]
    assert counts["events_written"] == lines["events.jsonl"]
    assert not any(counts["skipped"].values()) and not any(counts["notes_flagged_kept"].values()), counts


def finite_numbers(value, where: str = "") -> list[str]:
    """Paths of the floats in a JSON value that are not finite."""
    if isinstance(value, dict):
        return [bad for k, v in value.items() for bad in finite_numbers(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [bad for i, v in enumerate(value) for bad in finite_numbers(v, f"{where}[{i}]")]
    return [where] if isinstance(value, float) and not math.isfinite(value) else []


def run_readme_commands(work_dir: Path) -> None:
    """Each line of the README's bash block, as written, from the repository root, on one CPU device."""
    if not (REPO / ".venv" / "bin" / "notellm").is_file():
        pytest.fail(f"{REPO / '.venv/bin/notellm'} missing: the README's commands need `bash launch/setup.sh`")
    shutil.rmtree(work_dir, ignore_errors=True)
    env = dict(os.environ)
    # tests/conftest.py fakes 8 CPU devices for the suite; the README's reader has one.
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
    for argv in readme_commands():
        result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{shlex.join(argv)} failed:\n{result.stderr[-4000:]}"


def check_outputs(work_dir: Path) -> None:
    data_dir = work_dir / "data"
    stats = json.loads((data_dir / "stats.json").read_text())
    assert stats["import"]["source"] == "generic" and stats["import"]["notes_written"] > 0
    pairs = stats["splits"]["pairs"]
    assert all(pairs[split] > 0 for split in ("train", "val", "test")), pairs
    assert (work_dir / "export" / "notellm.json").is_file() and any((work_dir / "export" / "params").iterdir())

    embeddings = work_dir / "embeddings" / "notellm"
    meta = json.loads((embeddings / "embeddings.json").read_text())
    ids = [i for shard in meta["shards"] for i in (embeddings / shard["ids"]).read_text().split()]
    vectors = np.concatenate([np.load(embeddings / shard["embeddings"]) for shard in meta["shards"]])
    test_notes = json.loads((data_dir / "split.json").read_text())["test_notes"]
    assert sorted(ids) == sorted(test_notes) and len(ids) == len(set(ids)) == meta["count"]
    assert vectors.shape == (len(test_notes), meta["dim"]) and np.isfinite(vectors).all()

    metrics = json.loads((embeddings / "metrics.json").read_text())
    assert not finite_numbers(metrics), finite_numbers(metrics)
    recall = metrics["cooccurrence"]["recall"]
    assert recall and all(r["queries"] > 0 and 0.0 <= r["recall"] <= 1.0 for r in recall.values()), recall


@pytest.mark.slow
def test_readme_commands_run_as_written(example_config):
    work_dir = REPO / example_config.paths.work_dir
    assert work_dir.relative_to(REPO).parts[0] == "runs", "the example must write under runs/ (git-ignored)"
    run_readme_commands(work_dir)
    check_outputs(work_dir)
