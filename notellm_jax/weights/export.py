"""The trained NoteLLM as one folder: orbax params + `notellm.json` (model shape, head sizes, prompt, tokenizer).

This is what the embedding, evaluation, generation and serving tools load; it carries everything needed
to rebuild the prompt and the model without the training config. The tokenizer is recorded as its
configured source (relative to the config's roots), so a copied export works wherever the same shared
files are configured (`weights.tokenizer.resolve_tokenizer(config, export.tokenizer)`).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax

from notellm_jax.config import Config, PromptConfig
from notellm_jax.errors import MissingInputError
from notellm_jax.model.families import LlamaConfig
from notellm_jax.model.notellm import NoteLLM
from notellm_jax.model.params import abstract_params_on, unstack_layers
from notellm_jax.sharding import make_mesh
from notellm_jax.weights.hf import save_hf
from notellm_jax.weights.loading import model_levers
from notellm_jax.weights.tokenizer import tokenizer_source

FORMAT = "notellm_jax.export/2"


@dataclasses.dataclass
class NoteLLMExport:
    params: dict
    llama: LlamaConfig
    emb_dim: int
    prompt: PromptConfig
    tokenizer: str   # the tokenizer source, resolved with `resolve_tokenizer(config, tokenizer)`
    meta: dict[str, Any]


def save_notellm(out_dir: Path, params: dict, llama_cfg: LlamaConfig, config: Config) -> Path:
    """Called by every process: orbax writes each process's own shards of the (sharded) parameters, so
    nothing is gathered to one host."""
    import orbax.checkpoint as ocp  # orbax: only for this format
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out_dir / "params", params, force=True)
    meta = {"format": FORMAT, "llama": dataclasses.asdict(llama_cfg), "emb_dim": config.model.emb_dim,
            "prompt": dataclasses.asdict(config.prompt), "tokenizer": tokenizer_source(config),
            "objective": config.train.objective, "run": config.name, "checkpoint": config.model.checkpoint,
            "train_top_layers": config.model.train_top_layers, "levers": model_levers(config, llama_cfg)}
    if jax.process_index() == 0:
        (out_dir / "notellm.json").write_text(json.dumps(meta, indent=2))
    return out_dir


def load_notellm(path: str | Path, mesh=None) -> NoteLLMExport:
    """The export, its parameters restored straight into their shardings on `mesh` (each process reads
    only its own slices; default: this process's first device). Always into an explicit target, so the
    mesh the export was written from does not matter."""
    import orbax.checkpoint as ocp  # orbax: only for this format
    path = Path(path).absolute()
    meta_file = path / "notellm.json"
    if not meta_file.is_file():
        raise MissingInputError(f"{path} is not a NoteLLM export (no notellm.json); `notellm train` writes one "
                                "in <work_dir>/export, `notellm job` in <work_dir>/models/notellm/export")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_file}: format {meta.get('format')!r}, expected {FORMAT!r}")
    llama_cfg = LlamaConfig(**meta["llama"])
    mesh = mesh or make_mesh(1, 1, 1, devices=jax.local_devices()[:1])
    target = abstract_params_on(NoteLLM(llama_cfg, emb_dim=meta["emb_dim"], **meta.get("levers", {})), mesh)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(path / "params", target)
    return NoteLLMExport(params=params, llama=llama_cfg, emb_dim=meta["emb_dim"],
                         prompt=PromptConfig(**meta["prompt"]), tokenizer=meta["tokenizer"], meta=meta)


def export_model(export: NoteLLMExport) -> NoteLLM:
    """The NoteLLM module of an export, with the attention and pooling it was trained with."""
    return NoteLLM(export.llama, emb_dim=export.emb_dim, **export.meta.get("levers", {}))


def save_hf_decoder(params: dict, llama_cfg: LlamaConfig, out_dir: Path) -> Path:
    """The fine-tuned decoder of an export's `params` (LoRA already merged, [EMB] row included, an untied
    head when one was trained) as a transformers LlamaForCausalLM folder."""
    return save_hf(unstack_layers(params["decoder"]), llama_cfg.replace(scan_layers=False), out_dir)
