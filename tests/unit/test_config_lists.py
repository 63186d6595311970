"""`--set` list values are type-checked item by item; the error names the field and the item."""
from pathlib import Path

import pytest

from notellm_jax.config import load_config

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.py")


@pytest.mark.parametrize("assignment,message", [
    ('eval.ks=["a", 2]', "override 'eval.ks': item 0 is str 'a', expected int"),
    ("eval.ks=[1, 2.5]", "override 'eval.ks': item 1 is float 2.5, expected int"),
    ("eval.ks=[1, true]", "override 'eval.ks': item 1 is bool True, expected int"),
    ('data.sites=["a.stackexchange.com", 3]', "override 'data.sites': item 1 is int 3, expected str"),
    ('eval.paper_k_ratios=[0.5, "x"]', "override 'eval.paper_k_ratios': item 1 is str 'x', expected float"),
    ("eval.ks=[1, 2", r"override 'eval.ks': expected JSON, got '\[1, 2'"),
    ('eval.ks={"a": 1}', "override 'eval.ks': expected a JSON list"),
])
def test_mistyped_list_items_are_refused(assignment, message):
    with pytest.raises(ValueError, match=message):
        load_config(TINY, [assignment])


def test_well_typed_lists_are_taken():
    config = load_config(TINY, ["eval.ks=[3, 7]", "eval.paper_k_ratios=[1, 0.25]", 'data.sites=["x"]'])
    assert config.eval.ks == [3, 7] and config.data.sites == ["x"]
    assert config.eval.paper_k_ratios == [1.0, 0.25] and isinstance(config.eval.paper_k_ratios[0], float)


@pytest.mark.parametrize("assignment,message", [
    ("train.learning_rat=1e-5", r"override 'train.learning_rat': no field 'learning_rat' \(fields: .*learning_rate"),
    ("trian.seed=1", r"override 'trian.seed': no config section 'trian'"),
    ("train.seed", r"override 'train.seed' is not of the form section.field=value"),
])
def test_unknown_override_names_are_refused(assignment, message):
    with pytest.raises(ValueError, match=message):
        load_config(TINY, [assignment])
