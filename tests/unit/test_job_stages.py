"""The main job's stage list and the one stage-skip rule it shares with prepare."""
from pathlib import Path

import pytest

from notellm_jax.data.prepare import skip_stage
from notellm_jax.job.main_job import JOB_STAGES, Timer
from notellm_jax.main import main

REPO = Path(__file__).resolve().parents[2]


def test_skip_stage_when_every_output_exists_and_not_forced(tmp_path):
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "shards").mkdir()
    outputs = [tmp_path / "a.json", tmp_path / "shards"]
    assert skip_stage(outputs, force=False)
    assert not skip_stage(outputs, force=True)
    assert not skip_stage([*outputs, tmp_path / "missing.json"], force=False)


def test_timer_done_follows_the_rule_and_records_the_skip(tmp_path):
    timer, marker = Timer(), tmp_path / "metrics.json"
    assert not timer.done("recall x", marker, force=False) and timer.skipped == []
    marker.write_text("{}")
    assert not timer.done("recall x", marker, force=True) and timer.skipped == []
    assert timer.done("recall x", marker, force=False) and timer.skipped == ["recall x"]


@pytest.mark.parametrize("flag", ["--only", "--force"])
def test_unknown_job_stage_is_a_one_line_config_error_exit_2(flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["job", "--config", str(REPO / "configs" / "tiny.py"), "--set", f"paths.work_dir={tmp_path}",
              flag, "train,bogus"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"notellm job: error: {flag}: unknown stage(s) ['bogus']; stages are {', '.join(JOB_STAGES)}"]
    assert not (tmp_path / "timings.json").exists()
