"""SmolLM2-135M-Instruct (real weights, from its GGUF) on the Stack Exchange data: the main job's recipes.

Default (no argument): the whole main job (prepare, NoteLLM and its two ablations, the baselines, recall,
generation, report) sized for a 2-core CPU: about 50 minutes there (32-51 min on the two VM kinds measured),
about 54 min from a fresh clone with `launch/setup.sh`. What trains: the top `model.train_top_layers` (4)
decoder layers, the final norm, an untied copy of the LM head (`model.untie_head`), the [EMB] projection and
the logit scale; the frozen bottom's hidden states are computed once per distinct sequence and cached. Notes
are cut to 16 title + 48 content tokens; one epoch over a seeded sample of 1,024 training pairs (64 steps of
16 pairs). SentenceBERT fine-tunes on the same pairs, batch and epochs. The learning rate, alpha, r, the
trained depth and the single epoch were chosen on validation pairs with `notellm sweep`, never on test pairs.

Arguments (`configs/smollm2_se.py:ARG`):
- `quick`: a first look, the same stages in about 5 minutes on a 2-core CPU (4 min 42 s to 5 min 45 s
  measured): four small sites, 128 pairs for one epoch (8 steps), NoteLLM and two baselines, generation on
  16 notes. Its figures are a smoke test, not a result.
- `long`: every training pair once (36,354 pairs, 1,136 steps of 32), the top 2 layers on cached frozen-bottom
  features, the LM head packed at 5 rows per note. On a 2-core CPU NoteLLM's training takes about 1 h 50 min
  from an empty feature cache and 1 h with it filled; each ablation about 1 h on the filled cache; the
  uncapped SentenceBERT fine-tune about 1 h 40 min.
- `full`: the accelerator recipe: every layer trains, all pairs, one epoch of 64 pairs per batch, bf16,
  scanned and rematerialised layers; input from shards/tokens.npz (numpy only), so `notellm device run`
  needs neither TensorFlow nor gguf on that host. Estimated under 8 minutes on one H100/H200 (0.12 s per
  step measured there); its lr (3e-5) is its own and was not chosen on validation pairs at this scale.

Every run of these recipes, with its config, machine, wall time and recall: docs/results.md.
"""
from notellm_jax.config import (BaselineConfig, Config, DataConfig, GenerationConfig, ModelConfig,
                                PathsConfig, PromptConfig, TrainConfig, override, parse_arg)


def get_config(arg: str = "") -> Config:
    args = parse_arg(arg, quick=False, long=False, full=False)
    config = Config(
        name="smollm2_se",
        paths=PathsConfig(work_dir="runs/smollm2_se"),
        data=DataConfig(max_train_pairs=1024),
        model=ModelConfig(checkpoint="SmolLM2-135M-Instruct.Q4_1.gguf",  # under paths.cache_dir (launch/setup.sh)
                          train_top_layers=4),  # chosen on validation pairs (docs/results.md, Sweeps)
        prompt=PromptConfig(title_max_tokens=16, content_max_tokens=48, max_length=144, max_targets=16,
                            hashtag_fraction=0.2),  # r, chosen on validation pairs (docs/results.md, Sweeps)
        train=TrainConfig(batch_pairs=16, epochs=1.0,  # 64 steps, as each sweep setting was scored
                          learning_rate=3e-3, alpha=0.1,  # chosen on validation pairs (docs/results.md, Sweeps)
                          log_every=8, checkpoint_every=64),
        generation=GenerationConfig(limit=96, constrain_categories=True),
        # SentenceBERT fine-tunes for the NoteLLM recipe's steps (epochs x pairs / batch), uncapped: about
        # the wall time NoteLLM's training takes here.
        baselines=BaselineConfig(sbert_finetune_seconds=0.0),
    )
    if args.quick:
        config = override(config, {
            "name": "smollm2_se_quick", "paths.work_dir": "runs/smollm2_se_quick",
            "data.sites": ("coffee.stackexchange.com", "gadgets.stackexchange.com", "genai.stackexchange.com",
                           "htw.stackexchange.com"),
            "data.max_train_pairs": 128, "train.epochs": 1.0, "train.log_every": 2, "train.eval_batches": 2,
            "generation.limit": 16, "job.train_variants": ("notellm",),
            "job.baselines": ("prompteol", "sbert_zeroshot")})
    if args.long:
        config = override(config, {
            "name": "smollm2_se_long", "paths.work_dir": "runs/smollm2_se_long", "data.max_train_pairs": 0,
            "train.epochs": 1.0, "train.batch_pairs": 32, "train.log_every": 16, "train.checkpoint_every": 64,
            # lr and r from the default (chosen on validation pairs at 64 steps of 16 pairs, not at this scale);
            # 2 trained layers, not the default's 4, for the wall time (4 take about 1.8x as long per step).
            "train.learning_rate": 3e-3, "prompt.hashtag_fraction": 0.2,
            "model.train_top_layers": 2,
            # The LM head at 5 rows per note, packed (3.1 supervised tokens per note here, of 16 slots): the
            # same loss and gradients, 3.1 s per step instead of 5.1 (docs/benchmarks.md, train_step).
            "train.head_rows_per_note": 5})
    if args.full:
        config = override(config, {
            "name": "smollm2_se_full", "paths.work_dir": "runs/smollm2_se_full", "data.max_train_pairs": 0,
            "data.train_input": "numpy", "baselines.sbert_finetune_seconds": 0,
            "train.epochs": 1.0, "model.train_top_layers": 0, "model.compute_dtype": "bfloat16",
            "model.scan_layers": True, "model.remat_policy": "dots_with_no_batch_dims_saveable",
            "prompt.title_max_tokens": 20, "prompt.content_max_tokens": 80, "prompt.max_length": 192,
            "prompt.max_targets": 32, "train.batch_pairs": 64, "train.learning_rate": 3e-5})
    return config
