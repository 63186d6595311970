"""Config files, `--set` parsing, `override`, the environment step and `Config.validate`."""
import dataclasses
import json
from pathlib import Path

import pytest

from notellm_jax.config import Config, apply_override, load_config, override, parse_arg
from notellm_jax.errors import ConfigError
from notellm_jax.tools import sweep

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SWEEPS = Path(__file__).resolve().parents[2] / "docs" / "results" / "sweeps"
GRIDS = [CONFIGS / "sweep_example.json", CONFIGS / "sweep_levers.json", *sorted(SWEEPS.glob("*/grid.json"))]


PAPER_FAMILIES = ["llama2_7b", "llama3_8b", "qwen2_5_7b", "qwen3_8b", "mistral_7b", "gemma2_9b"]


@pytest.mark.parametrize("spec", ["tiny.py", "tiny.py:random", "smollm2_se.py", "smollm2_se.py:quick",
                                  "smollm2_se.py:full", "paper_7b.py:llama2_7b", "paper_7b.py:qwen3_8b,random"]
                         + [f"paper_7b.py:{family},aot" for family in PAPER_FAMILIES])
def test_every_shipped_config_loads_and_validates(spec):
    config = load_config(str(CONFIGS / spec))
    assert config.validate(8, 1, training=True) is config


def test_the_paper_recipe_takes_its_family_first():
    config = load_config(str(CONFIGS / "paper_7b.py") + ":mistral_7b,aot")
    assert (config.name, config.model.checkpoint) == ("mistral_7b", "random:mistral_7b")
    assert load_config(str(CONFIGS / "paper_7b.py") + ":llama3_8b").model.checkpoint.endswith("Llama-3.1-8B")
    for spec in ("", ":aot", ":llama2_7b,nope"):
        with pytest.raises(ConfigError, match="family|not understood"):
            load_config(str(CONFIGS / "paper_7b.py") + spec)


def test_configs_are_frozen_and_hashable():
    config = load_config(str(CONFIGS / "tiny.py"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.batch_pairs = 3  # type: ignore[misc]
    assert hash(config) == hash(load_config(str(CONFIGS / "tiny.py")))
    assert isinstance(config.data.sites, tuple)


def test_set_parses_by_field_type_and_lists_become_tuples():
    config = Config()
    config = apply_override(config, "train.learning_rate=1e-5")
    config = apply_override(config, "model.scan_layers=yes")
    config = apply_override(config, "retrieval.ks=[1, 10]")
    config = apply_override(config, 'job.baselines=["prompteol"]')
    assert (config.train.learning_rate, config.model.scan_layers) == (1e-5, True)
    assert config.retrieval.ks == (1, 10) and config.job.baselines == ("prompteol",)
    assert Config().train.learning_rate == 3e-6  # the original is untouched


@pytest.mark.parametrize("assignment,message", [
    ("train.nope=1", "no field 'nope'"),
    ("nosection.lr=1", "no config section 'nosection'"),
    ("train.batch_pairs=eight", "expected int"),
    ('retrieval.ks=["a", 2]', r"retrieval.ks\[0\]: expected int"),
    ("retrieval.ks=[1,", "expected JSON"),
    ("model.scan_layers=maybe", "expected a boolean"),
    ("train.batch_pairs", "not of the form"),
])
def test_bad_overrides_name_the_field(assignment, message):
    with pytest.raises(ConfigError, match=message):
        apply_override(Config(), assignment)


def test_override_type_checks_python_values():
    assert override(Config(), {"data.sites": ["a", "b"]}).data.sites == ("a", "b")
    with pytest.raises(ConfigError, match="expected int"):
        override(Config(), {"train.batch_pairs": "8"})
    with pytest.raises(ConfigError, match="expected int"):
        override(Config(), {"train.batch_pairs": True})


def test_config_arguments_follow_big_vision_grammar():
    args = parse_arg("quick,batch_pairs=64", quick=False, batch_pairs=8, full=False)
    assert (args.quick, args.batch_pairs, args.full) == (True, 64, False)
    with pytest.raises(ConfigError, match="'extra' is not understood"):
        load_config(str(CONFIGS / "tiny.py") + ":random,extra")
    with pytest.raises(ConfigError, match="'random:extra' is not understood"):
        load_config(str(CONFIGS / "tiny.py") + ":random:extra")
    with pytest.raises(ConfigError, match="needs a value"):
        parse_arg("batch_pairs", batch_pairs=8)


def test_environment_paths_apply_before_overrides_and_only_when_asked():
    tiny = str(CONFIGS / "tiny.py")
    assert load_config(tiny).paths.shared_dir == "../shared"  # nothing read from the environment by default
    env = {"NOTELLM_SHARED": "/data/shared", "NOTELLM_CACHE": "/data/cache"}
    config = load_config(tiny, environ=env)
    assert (config.paths.shared_dir, config.paths.cache_dir) == ("/data/shared", "/data/cache")
    assert load_config(tiny, ["paths.shared_dir=/x"], environ=env).paths.shared_dir == "/x"


def test_missing_config_and_missing_get_config(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "none.py"))
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="defines no get_config"):
        load_config(str(tmp_path / "empty.py"))


@pytest.mark.parametrize("updates,devices,message", [
    ({"train.batch_pairs": 3}, 8, "does not divide over data x fsdp = 8"),
    ({"mesh.fsdp": 3}, 8, "does not fit 8 devices"),
    ({"mesh.data": -1}, 8, "at most one -1"),
    ({"train.objective": "both"}, 1, "train.objective"),
    ({"prompt.max_targets": 500}, 1, "prompt.max_targets"),
    ({"model.scan_layers": True, "model.train_top_layers": 2}, 1, "train_top_layers needs"),
    ({"model.remat_policy": "everything"}, 1, "remat_policy"),
    ({"retrieval.ks": (0, 10)}, 1, "retrieval.ks"),
    ({"train.eval_batch_pairs": 3}, 8, "eval_batch_pairs=3 notes does not divide"),
    ({"train.eval_batch_pairs": -1}, 1, "eval_batch_pairs must be >= 0"),
    ({"serve.feature_cache_max_mb": 0}, 1, "serve.feature_cache_max_mb must be > 0"),
])
def test_validate_rejects_inconsistent_settings(updates, devices, message):
    with pytest.raises(ConfigError, match=message):
        override(Config(), updates).validate(devices, 1, training=True)


@pytest.mark.parametrize("updates,message", [
    ({"train.learning_rate": float("nan")}, r"^train\.learning_rate=nan: not a finite number$"),
    ({"train.learning_rate": float("inf")}, r"^train\.learning_rate=inf: not a finite number$"),
    ({"train.learning_rate": 0.0}, r"^train\.learning_rate=0\.0 must be > 0$"),
    ({"train.learning_rate": -1e-4}, r"^train\.learning_rate=-0\.0001 must be > 0$"),
    ({"serve.max_wait_ms": float("nan")}, r"^serve\.max_wait_ms=nan: not a finite number$"),
    ({"retrieval.paper_k_ratios": (0.1, float("-inf"))}, r"^retrieval\.paper_k_ratios\[1\]=-inf: not a finite"),
    ({"model.lora_alpha": float("nan"), "train.alpha": float("inf")}, r"^model\.lora_alpha=nan, train\.alpha=inf:"),
    ({"train.loss_spike_factor": 1.0}, r"train\.loss_spike_factor=1\.0 must be > 1 \(or 0 = off\)"),
    ({"train.loss_window": 0}, "train.loss_window must be >= 1"),
    ({"train.max_abs_log_logit_scale": 2.0}, r"must exceed \|model\.log_logit_scale_init\|=3\.0"),
    ({"train.max_grad_norm": -1.0}, "train.max_grad_norm and train.max_zero_grad_steps must be >= 0"),
    ({"embed.batch_tokens": -1}, r"^embed\.batch_tokens=-1 must be >= 0 \(0 = off\)$"),
])
def test_validate_rejects_nonfinite_floats_and_bad_rates_naming_the_field(updates, message):
    """Every float field anywhere in the config is walked (a NaN learning rate used to pass until step 2)."""
    with pytest.raises(ConfigError, match=message):
        override(Config(), updates).validate(1)
    with pytest.raises(ConfigError, match=r"train\.learning_rate=nan"):  # as `--set` writes it
        apply_override(Config(), "train.learning_rate=nan").validate(1)


def test_batch_layout_is_checked_only_for_training():
    config = override(Config(), {"train.batch_pairs": 3})
    config.validate(8, 1)  # embedding or evaluating with this config is fine
    with pytest.raises(ConfigError, match="not divisible by the 2 processes"):
        config.validate(2, 2, training=True)
    assert override(Config(), {"mesh.fsdp": 4, "mesh.data": -1}).mesh_shape(8) == (2, 4, 1)


@pytest.mark.parametrize("grid_path", GRIDS, ids=[p.parent.name if p.name == "grid.json" else p.name for p in GRIDS])
def test_committed_sweep_grids_expand_to_valid_settings_and_match_their_results(grid_path):
    """configs/sweep_example.json and every grid kept beside its sweep's table (docs/results/sweeps/*/grid.json):
    each setting applies to the default recipe and validates; a kept grid is the one its sweep.json records."""
    assert len(GRIDS) >= 7
    grid = json.loads(grid_path.read_text())
    base = load_config(str(CONFIGS / "smollm2_se.py"))
    for updates in sweep.settings(grid, "one_at_a_time"):
        assert sweep._typed(base, updates).validate(8, 1, training=True)
    if grid_path.name == "grid.json":
        assert json.loads((grid_path.parent / "sweep.json").read_text())["grid"] == grid
