"""The project's own checkpoint format: unscanned Flax params in `params/` (orbax) and the HF config.json
beside them, already in the Flax layout. orbax is imported only when this format is read or written."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from notellm_jax.errors import CheckpointError
from notellm_jax.model.families import LlamaConfig
from notellm_jax.model.params import unstack_layers
from notellm_jax.weights.hf import Params, TensorSpec, tensor_specs
from notellm_jax.weights.lazy import ArrayTensor, LazyTensor, VocabGrown

ORBAX_PARAMS = "params"


def save_orbax(params: Params, cfg: LlamaConfig, out_dir: str | Path) -> Path:
    """The project's format: unscanned params in `params/` (orbax) and the HF config.json beside them."""
    import orbax.checkpoint as ocp  # orbax: only for this format

    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(out_dir / ORBAX_PARAMS, unstack_layers(params), force=True)
    checkpointer.wait_until_finished()
    (out_dir / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
    return out_dir


def open_orbax(folder: Path, cfg: LlamaConfig, n_new: int, reset: int | None) -> Params:
    """The project's own format, already in the Flax layout: restored to the host, then seen lazily (a
    padded table is cut back to the config's vocabulary before any growth and re-padding)."""
    import orbax.checkpoint as ocp  # orbax: only for this format

    try:
        params = ocp.StandardCheckpointer().restore(folder.absolute() / ORBAX_PARAMS)
    except (ValueError, OSError, KeyError) as e:
        raise CheckpointError(f"{folder / ORBAX_PARAMS}: unreadable orbax checkpoint, truncated or corrupt "
                              f"({type(e).__name__}: {e})") from e
    _check_orbax_params(params, cfg, folder)
    padded = cfg.replace(vocab_size=cfg.vocab_size + n_new).padded_vocab_size
    lazy: dict[tuple[str, ...], LazyTensor] = {}
    for spec in tensor_specs(cfg):
        value = params
        for key in spec.tree_path:
            value = value[key]
        value = np.asarray(value)
        tensor: LazyTensor = ArrayTensor(value)
        if spec.vocab_axis is not None:  # a padded table is cut back to the config's vocabulary first
            value = np.take(value, np.arange(cfg.vocab_size), axis=spec.vocab_axis)
            tensor = VocabGrown(ArrayTensor(value), spec.vocab_axis, n_new, padded, reset)
        lazy[spec.tree_path] = tensor
    return unflatten_dict(lazy)


def _check_orbax_params(params: Params, cfg: LlamaConfig, folder: Path) -> None:
    """Every parameter the config implies is present with its shape (a token table may carry vocabulary
    padding beyond the config's vocab_size), and nothing else is there."""
    have = {"/".join(k): tuple(np.shape(v)) for k, v in flatten_dict(params).items()}
    specs = {"/".join(spec.tree_path): spec for spec in tensor_specs(cfg)}
    missing, extra = sorted(set(specs) - set(have)), sorted(set(have) - set(specs))
    wrong = [f"{k} {have[k]} (config.json implies {spec.kernel_shape})" for k, spec in sorted(specs.items())
             if k in have and not _fits(spec, have[k])]
    problems = ([f"missing {missing[:3]}"] if missing else []) + ([f"unexpected {extra[:3]}"] if extra else []) + \
        ([f"shapes {wrong[:3]}"] if wrong else [])
    if problems:
        raise CheckpointError(f"{folder / ORBAX_PARAMS}: parameters do not match {folder / 'config.json'}: "
                              + "; ".join(problems))


def _fits(spec: TensorSpec, shape: tuple[int, ...]) -> bool:
    """`shape` is the spec's kernel shape, up to vocabulary padding along its token axis."""
    if shape == spec.kernel_shape:
        return True
    return spec.vocab_axis is not None and len(shape) == len(spec.kernel_shape) and all(
        n == want or (axis == spec.vocab_axis and n > want)
        for axis, (n, want) in enumerate(zip(shape, spec.kernel_shape)))
