"""The SmolLM2-135M-Instruct recipes (real weights, from its GGUF) on the Stack Exchange data.

- `get_config()`: the default main job, sized for the project's 2-core CPU machines (ENVIRONMENT.md): the top
  `train_top_layers` decoder layers, the final norm, an untied copy of the LM head (`model.untie_head`), the
  [EMB] projection and tau train; the frozen bottom's hidden states are computed once per distinct sequence
  and cached; notes are cut to 16 title + 48 content tokens; two epochs over a seeded sample of 1,024 pairs.
  SentenceBERT fine-tunes on the same pairs, batch and epochs, capped at 5 minutes so that the main job keeps
  its wall time.
- `get_config("long")`: the long CPU recipe (about 2 hours here, estimated from the default's measured
  2.3 s per 16-pair step: not yet run): every training pair once, 32 pairs per batch, the same 2 trained
  layers and frozen-bottom cache; SentenceBERT on the same terms with a 1-hour cap.
- `get_config("gpu")` (alias "full"): the accelerator recipe, one H100/H200: every weight trains, all pairs,
  one epoch, 64 pairs per batch, bf16, paper token budgets; the input is shards/tokens.npz (numpy only) so
  `notellm_jax.tools.device_recipe` runs it on a host without TensorFlow or gguf.
None of these settings were chosen on test pairs; `notellm_jax.tools.sweep` selects on validation pairs.
"""
from notellm_jax.config import Config


def get_config(arg: str = "") -> Config:
    c = Config(name="smollm2_se")
    c.paths.work_dir = "runs/smollm2_se"
    c.data.source = "stackexchange"
    c.data.input_path = "data/stackexchange"
    c.data.num_shards = 4
    c.data.max_train_pairs = 1024
    c.model.checkpoint = "SmolLM2-135M-Instruct.Q4_1.gguf"  # under paths.cache_dir (launch/setup.sh)
    c.model.emb_dim = 128
    c.model.train_top_layers = 2
    c.prompt.layout = "paper"
    c.prompt.title_max_tokens = 16
    c.prompt.content_max_tokens = 48
    c.prompt.max_length = 144
    c.prompt.max_targets = 16
    c.prompt.hashtag_fraction = 0.4
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.train.batch_pairs = 16
    c.train.epochs = 2.0  # the second epoch reads the frozen-layer cache: ~4x cheaper per step
    c.train.learning_rate = 1e-4
    c.train.warmup_fraction = 0.1
    c.train.alpha = 0.01
    c.train.log_every = 8
    c.train.checkpoint_every = 64
    c.train.eval_batches = 4
    c.eval.embed_batch_size = 32
    c.eval.generation_limit = 96
    c.eval.sbert_finetune_steps = 0      # the NoteLLM recipe's steps (epochs x pairs / batch) ...
    c.eval.sbert_finetune_seconds = 300  # ... within 5 minutes (~5 s per 16-pair step on this CPU)
    c.eval.constrain_categories = True
    if arg == "long":
        c.name = "smollm2_se_long"
        c.paths.work_dir = "runs/smollm2_se_long"
        c.data.max_train_pairs = 0
        c.train.epochs = 1.0
        c.train.batch_pairs = 32
        c.train.log_every = 16
        c.train.checkpoint_every = 128
        c.eval.sbert_finetune_seconds = 3600
    if arg in ("gpu", "full"):  # accelerator setting: every layer, every pair, bf16
        c.name = "smollm2_se_gpu"
        c.paths.work_dir = "runs/smollm2_se_gpu"
        c.data.train_input = "numpy"
        c.eval.sbert_finetune_seconds = 0
        c.data.max_train_pairs = 0
        c.train.epochs = 1.0
        c.model.train_top_layers = 0
        c.model.compute_dtype = "bfloat16"
        c.model.scan_layers = True
        c.model.remat_policy = "dots_with_no_batch_dims_saveable"
        c.prompt.title_max_tokens = 20
        c.prompt.content_max_tokens = 80
        c.prompt.max_length = 192
        c.prompt.max_targets = 32
        c.train.batch_pairs = 64
        c.train.learning_rate = 3e-5
    elif arg not in ("", "long"):
        raise ValueError(f"configs/smollm2_se.py: unknown variant {arg!r} (choose '', 'long' or 'gpu')")
    return c
