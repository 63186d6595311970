"""The 7B configs' parameter layouts, pinned (MaxText's sharding_compare idea): the abstract parameters of
`configs/paper_7b.py:llama2_7b,aot` (32 scanned layers, [EMB] added, vocabulary padded) and of
`configs/paper_7b.py:gemma2_9b,aot` (42 scanned layers, four norms a block, tied 256k table) on an 8-device fsdp
mesh, every parameter's shape, dtype and PartitionSpec, against tests/golden/<family>_fsdp8_shardings.json.
A change to the logical rules, the model's axis names, the vocabulary padding or the scan layout shows up
here as a diff. Nothing is allocated (eval_shape only).

Regenerate after an intended change, and review the diff:
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu PYTHONPATH=. \\
        python tests/unit/test_sharding_golden.py
"""
from __future__ import annotations

import json
from pathlib import Path

import jax

import pytest

REPO = Path(__file__).resolve().parents[2]
GOLDEN = {family: REPO / "tests" / "golden" / f"{family}_fsdp8_shardings.json" for family in ("llama2_7b", "gemma2_9b")}
# Not vacuous: the embedding table really is split, 8 ways over fsdp, and the padded vocabulary divides.
EMBEDDING = {"llama2_7b": [32128, 4096], "gemma2_9b": [256128, 3584]}


def current_layout(family: str) -> dict[str, dict]:
    from notellm_jax.config import load_config
    from notellm_jax.model.families import preset
    from notellm_jax.sharding import make_mesh
    from notellm_jax.model.params import abstract_params_on
    from notellm_jax.weights.loading import make_model, runtime_llama_config

    config = load_config(str(REPO / "configs" / "paper_7b.py") + f":{family},aot")
    base = runtime_llama_config(config, preset(config.model.checkpoint.split(":", 1)[1]))
    llama_cfg = base.replace(vocab_size=base.vocab_size + 1)  # [EMB]
    abstract = abstract_params_on(make_model(config, llama_cfg), make_mesh(1, 8, 1, devices=jax.devices()[:8]))
    return {jax.tree_util.keystr(path): {"shape": list(leaf.shape), "dtype": str(leaf.dtype),
                                         "spec": [s if s is None or isinstance(s, str) else list(s)
                                                  for s in leaf.sharding.spec]}
            for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)}


@pytest.mark.parametrize("family", sorted(GOLDEN))
def test_7b_parameter_shardings_match_the_golden_file(family):
    golden = json.loads(GOLDEN[family].read_text())
    layout = current_layout(family)
    assert sorted(layout) == sorted(golden), (sorted(set(layout) ^ set(golden)))
    changed = {name: (layout[name], golden[name]) for name in golden if layout[name] != golden[name]}
    assert not changed, changed
    embedding = layout["['decoder']['embed_tokens']['embedding']"]
    assert embedding == {"shape": EMBEDDING[family], "dtype": "float32", "spec": ["tensor", "fsdp"]}


if __name__ == "__main__":
    for family, path in GOLDEN.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        layout = current_layout(family)
        lines = [f" {json.dumps(name)}: {json.dumps(layout[name])}" for name in sorted(layout)]
        path.write_text("{\n" + ",\n".join(lines) + "\n}\n")  # one parameter per line: readable diffs
        print(f"wrote {path}")
