"""`notellm <command>`: the one command line. Sets the environment, logging and the cluster up once, loads
the config, then calls the command's `run(args, config)` in its module (imported only then, so `--help`
and argument errors cost nothing and `plan --devices` can fake devices before jax is imported).

    notellm train     --config C [--set section.field=value ...]       (= python -m notellm_jax.train)
    notellm prepare   --config C [--stages a,b] [--force]              (= python -m notellm_jax.data.prepare)
    notellm embed     --config C [--checkpoint EXPORT] [--split test|all] [--name N] [--out DIR]
    notellm recall    --config C --embeddings DIR [--name N] [--out FILE] [--against RECALL_JSON ...]
    notellm generate  --config C --checkpoint EXPORT [--task ...] [--split ...] [--constrain-categories]
    notellm baselines --config C --name NAME [--split test|all] [--out DIR]
    notellm job       --config C [--only STAGES] [--force STAGES]     (= python -m notellm_jax.job)
    notellm plan      --config C --devices N
    notellm convert   SRC DST [--to hf|orbax] [--overwrite]
    notellm serve     --config C --index DIR [--export DIR] [--embeddings DIR] [--generate] [--host H --port P]
    notellm sweep     --config C --grid G.json --out DIR [--steps N] [--mode one_at_a_time|product]
    notellm device    pack|run --config C --bundle DIR [--out OUT]   (the accelerator recipe, no TF/gguf there)

User-input errors (the project's own `errors.NotellmError`s) end with one line and exit status 2 (3 for
a training run that diverged: `TrainingDivergedError`);
anything else propagates with its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

# command -> (module holding `run(args, config)`, one-line help, whether it takes --config)
COMMANDS = {
    "train": ("notellm_jax.train.trainer", "train or resume NoteLLM; checkpoints, metrics, export", True),
    "prepare": ("notellm_jax.data.prepare", "import -> co-occurrence -> splits -> tokenised shards", True),
    "embed": ("notellm_jax.infer.embed", "embed notes with a trained export", True),
    "recall": ("notellm_jax.eval.recall", "Recall@k of an embeddings folder (exact + ScaNN)", True),
    "generate": ("notellm_jax.eval.generation", "generate categories/hashtags and score them", True),
    "baselines": ("notellm_jax.eval.baselines", "baseline embeddings in the same format", True),
    "job": ("notellm_jax.job.main_job", "the main job: every stage, then the report", True),
    "plan": ("notellm_jax.plan", "compile the step ahead of time; per-device memory", True),
    "convert": ("notellm_jax.weights.convert", "convert weights between HF, llama2.c, GGUF, orbax", False),
    "serve": ("notellm_jax.serve.cli", "serve new-note embeddings and nearest notes over HTTP", True),
    "sweep": ("notellm_jax.tools.sweep", "hyper-parameter sweep scored on validation pairs", True),
    "device": ("notellm_jax.tools.device_recipe", "pack / run the accelerator recipe (numpy-only inputs)", True),
}


def _tool_arguments(name: str, p: argparse.ArgumentParser) -> None:
    """The options of each command beyond --config/--set."""
    if name == "embed":
        p.add_argument("--checkpoint", help="NoteLLM export folder (default <work_dir>/export)")
        p.add_argument("--split", choices=("test", "all"), default="test")
        p.add_argument("--name", default="notellm", help="model name recorded in embeddings.json")
        p.add_argument("--out", help="output folder (default <work_dir>/embeddings/<name>)")
    elif name == "prepare":
        p.add_argument("--stages", help="comma-separated subset of import,cooccurrence,splits,shards,tfds "
                       "(default all; tfds only with data.train_input=tfds)")
        p.add_argument("--force", action="store_true", help="rerun stages whose outputs exist")
    elif name == "recall":
        p.add_argument("--embeddings", required=True, help="folder written by embed or baselines")
        p.add_argument("--name", help="model name in the output (default: the one in embeddings.json)")
        p.add_argument("--out", help="metrics JSON (default <embeddings>/metrics.json)")
        p.add_argument("--against", action="append", metavar="RECALL_JSON",
                       help="another recall result on the same test notes and pairs (repeatable): adds this "
                            "model minus that one, with paired bootstrap intervals")
    elif name == "generate":
        p.add_argument("--checkpoint", required=True, help="a NoteLLM export folder (<work_dir>/export)")
        p.add_argument("--task", choices=("both", "category", "hashtag"), default="both")
        p.add_argument("--split", choices=("train", "test"), default="test")
        p.add_argument("--out", help="output folder (default <work_dir>/generation)")
        p.add_argument("--constrain-categories", action="store_true", default=None,
                       help="decode categories through the closed-set trie (default: generation.constrain_categories)")
        p.add_argument("--limit", type=int, help="only the split's first N notes")
    elif name == "baselines":
        p.add_argument("--name", required=True,
                       choices=("llm_last_token", "prompteol", "sbert_zeroshot", "sbert_finetuned"))
        p.add_argument("--split", choices=("test", "all"), default="test")
        p.add_argument("--out", help="output folder (default <work_dir>/embeddings/<name>)")
    elif name == "job":
        p.add_argument("--only", help="comma-separated stages to run (default all)")
        p.add_argument("--force", help="comma-separated stages to redo even if their outputs exist")
    elif name == "plan":
        p.add_argument("--devices", type=int, default=0, help="fake this many CPU devices")
    elif name == "sweep":
        p.add_argument("--grid", required=True, help="JSON: {section.field: [values, ...]}")
        p.add_argument("--out", required=True, help="folder for the settings' runs and the table")
        p.add_argument("--steps", type=int, default=64, help="training steps per setting")
        p.add_argument("--mode", default="one_at_a_time", choices=("one_at_a_time", "product"))
    elif name == "device":
        p.add_argument("action", choices=("pack", "run"))
        p.add_argument("--bundle", required=True, help="the folder that travels to the device")
        p.add_argument("--out", help="run: where embeddings/ and summary.json go")
    elif name == "convert":
        p.add_argument("src", help="HF folder, llama2.c .bin, .gguf file or orbax folder")
        p.add_argument("dst", help="output folder")
        p.add_argument("--to", choices=("hf", "orbax"), default="hf", help="output format (default hf)")
        p.add_argument("--overwrite", action="store_true", help="write into a non-empty DST")
    elif name == "serve":
        from notellm_jax.serve.cli import add_arguments
        add_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="notellm", description="NoteLLM in JAX/Flax (arXiv 2403.01744).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text, takes_config) in COMMANDS.items():
        p = commands.add_parser(name, help=help_text, description=help_text)
        if takes_config:
            p.add_argument("--config", required=True, help="configs/<name>.py[:arg]")
            p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                           help="override a config field (repeatable), e.g. --set train.learning_rate=1e-5")
        _tool_arguments(name, p)
    return parser


def main(argv: list[str] | None = None) -> Any:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "plan":
        from notellm_jax.plan import fake_devices
        fake_devices(args.devices)
    from notellm_jax import runtime
    runtime.set_environment_defaults()
    runtime.configure_logging()
    import os

    from notellm_jax.config import load_config
    from notellm_jax.distributed import init_distributed
    from notellm_jax.errors import NotellmError
    module, _, takes_config = COMMANDS[args.command]
    try:
        config = load_config(args.config, args.overrides, environ=os.environ) if takes_config else None
        init_distributed()
        if config is not None:
            import jax
            config.validate(jax.device_count(), jax.process_count(), training=args.command == "train")
        return importlib.import_module(module).run(args, config)
    except NotellmError as e:
        print(f"notellm {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(getattr(e, "exit_code", 2)) from None


def cli() -> None:
    """The `notellm` console script. Its generated wrapper passes the function's return value to sys.exit,
    so `main` (which returns the command's result, a dict for most commands) would end a successful run
    with exit status 1; this returns None: status 0 on success."""
    main()


if __name__ == "__main__":
    main()
