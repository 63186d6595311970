"""Every entry point answers --help: the `notellm` console script (installed by pyproject) and each
`python -m` form, which all dispatch through `notellm_jax.main`; user errors end in one line, exit 2.
Each command's module owns its options; `notellm --help` imports none of them, and `plan`'s imports none
of jax (its --devices must come first)."""
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from notellm_jax.main import COMMANDS

REPO = Path(__file__).resolve().parents[2]
MODULE_FORMS = {"train": "notellm_jax.train", "job": "notellm_jax.job", "serve": "notellm_jax.serve"}


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), cwd=REPO, capture_output=True, text=True, timeout=300)


def test_console_script_lists_every_command():
    script = Path(sys.executable).parent / "notellm"
    result = run(str(script) if script.is_file() else sys.executable, *([] if script.is_file() else ["-m", "notellm_jax"]),
                 "--help")
    assert result.returncode == 0, result.stderr
    for name in COMMANDS:
        assert name in result.stdout


def test_console_script_exits_0_after_a_command_that_returns_a_result(tmp_path, shared_dir):
    """The generated wrapper calls sys.exit(entry point()): a returned dict would mean exit status 1."""
    script = Path(sys.executable).parent / "notellm"
    assert script.is_file(), "the notellm console script is not installed (bash launch/setup.sh)"
    result = run(str(script), "prepare", "--config", str(REPO / "configs" / "tiny.py"), "--stages", "import",
                 "--set", f"paths.work_dir={tmp_path}", "--set", f"paths.shared_dir={shared_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "data" / "notes.parquet").is_file()


@pytest.mark.parametrize("command", sorted(MODULE_FORMS))
def test_python_m_forms_dispatch_to_their_command(command):
    assert set(MODULE_FORMS) <= set(COMMANDS)
    result = run(sys.executable, "-m", MODULE_FORMS[command], "--help")
    assert result.returncode == 0, result.stderr
    assert f"usage: notellm {command}" in result.stdout


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_answers_help_through_python_m_notellm_jax(command):
    result = run(sys.executable, "-m", "notellm_jax", command, "--help")
    assert result.returncode == 0, result.stderr
    assert f"usage: notellm {command}" in result.stdout


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_module_owns_its_arguments_and_run(command):
    module = importlib.import_module(COMMANDS[command][0])
    assert callable(module.add_arguments) and callable(module.run)


def test_the_top_level_help_imports_no_command_module():
    code = ("import sys; from notellm_jax.main import COMMANDS, build_parser; build_parser(); "
            "print(sorted(m for m, _, _ in COMMANDS.values() if m in sys.modules), 'jax' in sys.modules)")
    result = run(sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[]", "False"]


def test_plan_fakes_its_devices_before_jax_is_imported():
    """`plan --devices N` works only if nothing imported jax before the command's before_jax hook ran."""
    code = ("import sys; from notellm_jax import main; "
            "p = main.build_parser('plan'); args = p.parse_args(['plan', '--config', 'c', '--devices', '3']); "
            "assert 'jax' not in sys.modules; main.importlib.import_module(main.COMMANDS['plan'][0]).before_jax(args); "
            "import jax; print(jax.device_count())")
    result = run(sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "3"


def test_user_errors_are_one_line_and_exit_2(tmp_path):
    result = run(sys.executable, "-m", "notellm_jax", "train", "--config", str(REPO / "configs" / "tiny.py"),
                 "--set", "train.nope=1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "notellm train: error: override 'train.nope': no field 'nope' (has: " + result.stderr.split("(has: ")[1].strip()]
    assert "Traceback" not in result.stderr
