"""`notellm <command>`: the one command line. A table of commands and a loop: each command's module owns its
options (`add_arguments(parser)`) beside `run(args, config)`, and may define `before_jax(args)` for what must
happen before jax is imported (`plan --devices` fakes CPU devices). Only the chosen command's module is
imported, so `notellm --help` and a mistyped command cost nothing. Sets the environment, logging and the
cluster up once, loads and validates the config, then calls the command's `run`.

    notellm train     --config C [--set section.field=value ...]       (= python -m notellm_jax.train)
    notellm prepare   --config C [--stages a,b] [--force]
    notellm synthetic --out DIR [--events N] [--seed S]               (a seeded synthetic behaviour log)
    notellm embed     --config C [--checkpoint EXPORT] [--split test|all] [--name N] [--out DIR]
    notellm recall    --config C --embeddings DIR|--bm25 [--name N] [--out FILE] [--against RECALL_JSON ...]
    notellm generate  --config C --checkpoint EXPORT [--task ...] [--split ...] [--constrain-categories]
    notellm baselines --config C --name NAME [--split test|all] [--out DIR]
    notellm job       --config C [--only STAGES] [--force STAGES]     (= python -m notellm_jax.job)
    notellm plan      --config C --devices N
    notellm convert   SRC DST [--to hf|orbax|sentence-transformers] [--overwrite]
    notellm index     check|recover DIR                             (verify / repair a live index's files)
    notellm serve     --config C --index DIR [--export DIR] [--embeddings DIR] [--generate] [--host H --port P]
                                                                       (= python -m notellm_jax.serve)
    notellm sweep     --config C --grid G.json --out DIR [--steps N] [--mode one_at_a_time|product]
    notellm device    pack|run --config C --bundle DIR [--out OUT]   (the accelerator recipe, no TF/gguf there)

User-input errors (the project's own `errors.NotellmError`s) end with one line and exit status 2 (3 for
a training run that diverged: `TrainingDivergedError`);
anything else propagates with its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from notellm_jax import runtime
from notellm_jax.config import load_config
from notellm_jax.errors import NotellmError

# command -> (module owning `add_arguments(parser)` and `run(args, config)`, one-line help, takes --config)
COMMANDS = {
    "train": ("notellm_jax.train.trainer", "train or resume NoteLLM; checkpoints, metrics, export", True),
    "prepare": ("notellm_jax.data.prepare", "import -> co-occurrence -> splits -> tokenised shards", True),
    "synthetic": ("notellm_jax.data.synthetic", "write a seeded synthetic behaviour log as an imported store", False),
    "embed": ("notellm_jax.infer.embed", "embed notes with a trained export", True),
    "recall": ("notellm_jax.eval.recall", "Recall@k of an embeddings folder (exact + ScaNN)", True),
    "generate": ("notellm_jax.eval.generation", "generate categories/hashtags and score them", True),
    "baselines": ("notellm_jax.eval.baselines", "baseline embeddings in the same format", True),
    "job": ("notellm_jax.job.main_job", "the main job: every stage, then the report", True),
    "plan": ("notellm_jax.tools.plan", "compile the step ahead of time; per-device memory", True),
    "convert": ("notellm_jax.infer.export_formats", "convert weights (HF, llama2.c, GGUF, orbax) or an export "
                "(HF, sentence-transformers)", False),
    "serve": ("notellm_jax.serve.cli", "serve new-note embeddings and nearest notes over HTTP", True),
    "index": ("notellm_jax.serve.index_cli", "check or recover a live index folder's files", False),
    "sweep": ("notellm_jax.tools.sweep", "hyper-parameter sweep scored on validation pairs", True),
    "device": ("notellm_jax.tools.device_recipe", "pack / run the accelerator recipe (numpy-only inputs)", True),
}


def chosen_command(argv: Sequence[str]) -> str | None:
    """The command named in argv: the top-level parser has no option but -h, so its first non-option word."""
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command with its help; the options of `command` only, from its module (the one imported)."""
    parser = argparse.ArgumentParser(prog="notellm", description="NoteLLM in JAX/Flax (arXiv 2403.01744).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text, takes_config) in COMMANDS.items():
        p = commands.add_parser(name, help=help_text, description=help_text)
        if name != command:
            continue
        if takes_config:
            p.add_argument("--config", required=True, help="configs/<name>.py[:arg]")
            p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                           help="override a config field (repeatable), e.g. --set train.learning_rate=1e-5")
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> Any:
    argv = list(sys.argv[1:] if argv is None else argv)
    runtime.set_environment_defaults()  # before a command module imports transformers or TensorFlow
    args = build_parser(chosen_command(argv)).parse_args(argv)
    module_name, _, takes_config = COMMANDS[args.command]
    module = importlib.import_module(module_name)
    if hasattr(module, "before_jax"):
        module.before_jax(args)
    runtime.configure_logging()
    try:
        config = load_config(args.config, args.overrides, environ=os.environ) if takes_config else None
        _start_cluster(config)
        return module.run(args, config)
    except NotellmError as e:
        print(f"notellm {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(getattr(e, "exit_code", 2)) from None


def _start_cluster(config) -> None:
    """Join the cluster (a no-op on one host) and check the config against its devices (the training rules
    are checked where a training run starts, `trainer.setup`, which the job and the sweep reach too)."""
    import jax  # jax only after the command's before_jax hook (plan --devices fakes CPU devices)

    from notellm_jax.distributed import init_distributed  # imports jax: as above
    init_distributed()
    if config is not None:
        config.validate(jax.device_count(), jax.process_count())


def cli() -> None:
    """The `notellm` console script. Its generated wrapper passes the function's return value to sys.exit,
    so `main` (which returns the command's result, a dict for most commands) would end a successful run
    with exit status 1; this returns None: status 0 on success."""
    main()
