"""The 7B config's parameter layout, pinned (MaxText's sharding_compare idea): the abstract parameters of
`configs/paper_7b.py:llama2_7b,aot` (32 scanned layers, [EMB] added, vocabulary padded) on an 8-device fsdp mesh,
every parameter's shape, dtype and PartitionSpec, against tests/golden/llama2_7b_fsdp8_shardings.json.
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

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden" / "llama2_7b_fsdp8_shardings.json"


def current_layout() -> dict[str, dict]:
    from notellm_jax.config import load_config
    from notellm_jax.model.families import preset
    from notellm_jax.sharding import make_mesh
    from notellm_jax.model.params import abstract_params_on
    from notellm_jax.weights.loading import make_model, runtime_llama_config

    config = load_config(str(REPO / "configs" / "paper_7b.py") + ":llama2_7b,aot")
    base = runtime_llama_config(config, preset(config.model.checkpoint.split(":", 1)[1]))
    llama_cfg = base.replace(vocab_size=base.vocab_size + 1)  # [EMB]
    abstract = abstract_params_on(make_model(config, llama_cfg), make_mesh(1, 8, 1, devices=jax.devices()[:8]))
    return {jax.tree_util.keystr(path): {"shape": list(leaf.shape), "dtype": str(leaf.dtype),
                                         "spec": [s if s is None or isinstance(s, str) else list(s)
                                                  for s in leaf.sharding.spec]}
            for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)}


def test_llama2_7b_parameter_shardings_match_the_golden_file():
    golden = json.loads(GOLDEN.read_text())
    layout = current_layout()
    assert sorted(layout) == sorted(golden), (sorted(set(layout) ^ set(golden)))
    changed = {name: (layout[name], golden[name]) for name in golden if layout[name] != golden[name]}
    assert not changed, changed
    # Not vacuous: the big tables really are split, 8 ways over fsdp, and the padded vocabulary divides.
    embedding = layout["['decoder']['embed_tokens']['embedding']"]
    assert embedding == {"shape": [32128, 4096], "dtype": "float32", "spec": ["tensor", "fsdp"]}


if __name__ == "__main__":
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    layout = current_layout()
    lines = [f" {json.dumps(name)}: {json.dumps(layout[name])}" for name in sorted(layout)]
    GOLDEN.write_text("{\n" + ",\n".join(lines) + "\n}\n")  # one parameter per line: readable diffs
    print(f"wrote {GOLDEN}")
